# The part of Nixpkgs' lib that bonsai's glue and small packages use, with Nixpkgs' names.
rec {
  inherit (builtins) concatStringsSep elem filter head length map toString;
  versionAtLeast = v1: v2: builtins.compareVersions v2 v1 != 1;
  versionOlder = v1: v2: builtins.compareVersions v2 v1 == 1;
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalString = cond: s: if cond then s else "";
  optionalAttrs = cond: as: if cond then as else { };
  getOutput = output: pkg: if pkg ? outputSpecified && pkg.outputSpecified then pkg else pkg.${output} or pkg.out or pkg;
  getBin = getOutput "bin";
  getLib = getOutput "lib";
  getDev = getOutput "dev";
  makeBinPath = pkgs: concatStringsSep ":" (map (p: "${getBin p}/bin") pkgs);
  makeLibraryPath = pkgs: concatStringsSep ":" (map (p: "${getLib p}/lib") pkgs);
  fix = f: let x = f x; in x;
  # An overlay: self: super: { ... }, applied like Nixpkgs' lib.extends.
  extends = overlay: f: self: let super = f self; in super // overlay self super;
  # lib.functionArgs, setFunctionArgs, mirrorFunctionArgs and makeOverridable
  # (lib/trivial.nix, lib/customisation.nix): `.override` is a functor that carries the
  # function's formals, so `functionArgs pkg.override` lists what it takes.
  setFunctionArgs = f: args: { __functor = self: f; __functionArgs = args; };
  functionArgs = f: if f ? __functor then f.__functionArgs or (functionArgs (f.__functor f)) else builtins.functionArgs f;
  mirrorFunctionArgs = f: let fArgs = functionArgs f; in g: setFunctionArgs g fArgs;
  makeOverridable = f:
    let mirrorArgs = mirrorFunctionArgs f; in
    mirrorArgs (origArgs:
      let
        result = f origArgs;
        overrideWith = newArgs: origArgs // (if builtins.isFunction newArgs then newArgs origArgs else newArgs);
      in
      if builtins.isAttrs result
      then result // { override = mirrorArgs (newArgs: makeOverridable f (overrideWith newArgs)); }
      else result);
  # lib.systems.elaborate for the two systems bonsai ships boards for.
  systems.elaborate = import ./systems.nix;
}
