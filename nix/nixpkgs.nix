# Real Nixpkgs as bonsai's package source: the same attribute names as the offline set.
# `nixpkgs` is a path to a checkout; `nixpkgsFlake` a flake reference (github:NixOS/nixpkgs/...).
# Other architectures use Nixpkgs' cross package sets (localSystem = the host).
# The import is pure: `config = { }` and the given overlays only, so the user's
# ~/.config/nixpkgs (config.nix, overlays) and NIXPKGS_CONFIG never change an image.
{ nixpkgs ? null
, nixpkgsFlake ? null
, system
, hostSystem
  # Overlays: `final: prev: { ... }` functions, or paths to files holding one (profiles add them).
, overlays ? [ ]
}:
let
  src =
    if nixpkgs != null then nixpkgs
    else if nixpkgsFlake != null then (builtins.getFlake nixpkgsFlake).outPath
    else throw "bonsai: source nixpkgs needs --nixpkgs <path or flake reference>";
  where = if nixpkgs != null then toString nixpkgs else nixpkgsFlake;

  # Nixpkgs' own minimum-Nix gate (lib/minfeatures.nix since mid-2025, lib/minver.nix before),
  # checked first: its abort would say "please upgrade" without saying how.
  minfeatures = src + "/lib/minfeatures.nix";
  minver = src + "/lib/minver.nix";
  missing =
    if builtins.pathExists minfeatures then map (f: f.description) (import minfeatures).missing
    else if builtins.pathExists minver then
      (let v = import minver; in if builtins.compareVersions v builtins.nixVersion == 1 then [ "at least ${v}" ] else [ ])
    else [ ];
  # "`builtins.nixVersion` reports at least 2.18" -> "2.18".
  wanted = let ms = builtins.filter (m: m != null) (map (d: builtins.match ".*at least ([0-9][0-9.]*).*" d) missing);
    in if ms == [ ] then builtins.concatStringsSep "; " missing else builtins.head (builtins.head ms);
  gate =
    if missing == [ ] then true
    else throw "bonsai: Nixpkgs at ${where} needs Nix >= ${wanted}; this is Nix ${builtins.nixVersion}: set BONSAI_NIX=debian13 (bonsai's pinned Nix 2.26) or put a newer Nix on PATH";

  args = {
    config = { };
    overlays = map (o: if builtins.isFunction o then o else import o) overlays;
    localSystem = hostSystem;
  } // (if system == hostSystem then { } else { crossSystem = system; });
  pkgs = builtins.seq gate (import src args);
  kernelArch = { "x86_64-linux" = "x86_64"; "aarch64-linux" = "arm64"; }.${system}
    or (throw "bonsai: unsupported system ${system}");
in
pkgs // {
  bonsai = {
    inherit kernelArch;
    # Same script as the offline set, with Nixpkgs' build tools.
    mkKernelConfig = { src, version, base, fragments, script }:
      pkgs.stdenv.mkDerivation {
        name = "linux-config-${version}";
        inherit src base kernelArch;
        fragments = builtins.concatStringsSep " " (map toString fragments);
        crossPrefix = pkgs.stdenv.cc.targetPrefix;
        depsBuildBuild = [ pkgs.buildPackages.stdenv.cc ];
        nativeBuildInputs = with pkgs.buildPackages; [ flex bison bc perl gnumake ];
        dontUnpack = true;
        dontConfigure = true;
        dontInstall = true;
        dontFixup = true;
        buildPhase = "sh ${script}";
      };
  };
}
