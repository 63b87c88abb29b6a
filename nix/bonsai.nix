# bonsai's entry point into Nix. `cargo xtask build` calls
#   nix-build nix/bonsai.nix --argstr request '<json>' ... -A packages.p0 -A kernelConfig -A kernel
# request: { "packages": ["busybox", "hello", ...],
#            "localPackages": { "hello": { "path": "examples/hello/default.nix", "profile": "profiles/minimal.toml" } },
#            "overlays": [ { "path": "overlays/x.nix", "profile": "profiles/minimal.toml" } ],
#            "overrides": { "busybox": { "args": { "enableStatic": true }, "from": { "enableStatic": "profiles/p.toml" } } },
#            "kernel": { "package": "linux" } | { "base": "tinyconfig", "fragments": ["x.config"] } }
# The package source is the offline set (nix/offline) or a Nixpkgs checkout or flake.
{ source ? "offline"
, system
, hostSystem ? builtins.currentSystem
, request
  # offline set
, debs ? null
, bootstrap ? null
, hostTools ? "/usr/bin:/bin"
, toolchainId ? "unknown"
  # real Nixpkgs: a path (nixpkgs) or a flake reference (nixpkgsFlake)
, nixpkgs ? null
, nixpkgsFlake ? null
}:
let
  req = builtins.fromJSON request;

  # The profile's overlays: { path (relative to the repository root), profile }, parents' first.
  # Each file holds `final: prev: { ... }`; both package sets apply them as Nixpkgs does.
  overlays = map (o:
    let
      f = import (../. + "/${o.path}");
      bad = what: throw "bonsai: ${o.profile}: key 'overlays': ${o.path} ${what} (an overlay is `final: prev: { ... }`)";
    in
    if !builtins.isFunction f then bad "is not a function"
    else final: prev:
      let g = f final; in
      if !builtins.isFunction g then bad "takes one argument, not two"
      else let r = g prev; in if builtins.isAttrs r then r else bad "does not return an attribute set"
  ) (req.overlays or [ ]);

  # The profile's [overrides.<attribute>]: { args, from = argument -> profile file }, applied
  # as one overlay after the profile's own: `attribute = prev.attribute.override args`, so in
  # Nixpkgs every package that takes the attribute gets the overridden one. An argument the
  # function does not take is an error naming the profile key and listing the ones it takes
  # (the function's formals, as `lib.functionArgs` reads them through `.override`).
  overridesReq = req.overrides or { };
  argsOf = f:
    if builtins.isFunction f then builtins.functionArgs f
    else if f ? __functor then f.__functionArgs or (builtins.functionArgs (f.__functor f))
    else { };
  overrideOne = prev: attr: o:
    let
      names = builtins.attrNames o.args;
      firstFrom = o.from.${builtins.head names};
      where = "bonsai: ${firstFrom}: key 'overrides.${attr}'";
      pkg = prev.${attr};
      accepted = argsOf pkg.override;
      unknown = builtins.filter (a: !(accepted ? ${a})) names;
      bad = builtins.head unknown;
      takes = builtins.concatStringsSep ", " (builtins.attrNames accepted);
    in
    if !(prev ? ${attr}) then throw "${where}: '${attr}' is not an attribute of the ${source} package set"
    else if !(builtins.isAttrs pkg) || !(pkg ? override) then throw "${where}: '${attr}' has no .override (it is not made with callPackage or lib.makeOverridable)"
    else if accepted != { } && unknown != [ ] then throw "bonsai: ${o.from.${bad}}: key 'overrides.${attr}.${bad}': ${attr}.override takes no argument '${bad}'; it takes: ${takes}"
    else pkg.override o.args;
  overridesOverlay = final: prev: builtins.mapAttrs (overrideOne prev) overridesReq;
  allOverlays = overlays ++ (if overridesReq == { } then [ ] else [ overridesOverlay ]);

  basePkgs =
    if source == "offline" then import ./offline { inherit system hostSystem debs bootstrap hostTools toolchainId; overlays = allOverlays; }
    else if source == "nixpkgs" then import ./nixpkgs.nix { inherit nixpkgs nixpkgsFlake system hostSystem; overlays = allOverlays; }
    else throw "bonsai: unknown package source '${source}' (expected offline or nixpkgs)";

  # The profile's [local-packages]: name -> { path (relative to the repository root), profile }.
  # Each file is a function called with the package set's own callPackage, in a scope that also
  # holds the other local packages; a name the set already has is an error.
  localReq = req.localPackages or { };
  scope = if basePkgs ? newScope then basePkgs.newScope locals else basePkgs.callPackage;
  locals = builtins.mapAttrs (name: l: scope (../. + "/${l.path}") { }) localReq;
  clashes = builtins.filter (name: basePkgs ? ${name}) (builtins.attrNames localReq);
  clash = builtins.head clashes;
  pkgs =
    if clashes != [ ]
    then throw "bonsai: ${localReq.${clash}.profile}: key 'local-packages.${clash}': '${clash}' is already an attribute of the ${source} package set; choose another name"
    else basePkgs // locals;

  attrByDottedPath = path:
    let
      parts = builtins.filter builtins.isString (builtins.split "\\." path);
      step = acc: part:
        if builtins.isAttrs acc && acc ? ${part} then acc.${part}
        else throw "bonsai: package attribute '${path}' does not exist in the ${source} package set";
    in builtins.foldl' step pkgs parts;

  indexed = list: builtins.listToAttrs (builtins.genList (i: { name = "p${toString i}"; value = builtins.elemAt list i; }) (builtins.length list));

  kernelReq = req.kernel;
  fromPackage = kernelReq ? package;
  prebuilt = attrByDottedPath kernelReq.package;

  src = pkgs.linux.src;
  version = pkgs.linux.version;
  # Fragments enter the store by their bytes alone (not their file names), so a board copied
  # under another name with the same fragment files reuses the cached kernel. A fragment whose
  # bytes differ, even in a comment, is a new input of the config and so of the kernel.
  fragments = map (f: builtins.path { path = ../kernel-configs + "/${f}"; name = "kernel-fragment.config"; }) (kernelReq.fragments or [ ]);

  kernelConfig = pkgs.bonsai.mkKernelConfig {
    inherit src version fragments;
    base = kernelReq.base or "tinyconfig";
    script = ./kernel-config.sh;
  };
  kernel =
    if fromPackage then prebuilt
    # The merged config goes in as a derivation output that evaluation never reads: no import
    # from derivation, so Hydra, `nix flake check` and allow-import-from-derivation = false
    # evaluate every board.
    else pkgs.linuxManualConfig {
      inherit src version;
      configfile = "${kernelConfig}/config";
      allowImportFromDerivation = false;
      # bonsai reads CONFIG_MODULES from the fragments: with it the kernel has a `modules` output.
      config = if kernelReq.modular or false then { CONFIG_MODULES = "y"; } else { };
    };
  # Every override is checked, also of attributes the image does not name.
  checked = builtins.foldl' (acc: attr: builtins.seq pkgs.${attr} acc) true (builtins.attrNames overridesReq);
in
{
  packages = builtins.seq checked (indexed (map attrByDottedPath req.packages));
  kernelConfig = if fromPackage then null else kernelConfig;
  inherit kernel;
  # What the image's SBOM and reports say about the source.
  meta = { inherit source; linuxVersion = version; };
}
