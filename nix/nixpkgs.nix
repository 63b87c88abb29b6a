# Real Nixpkgs as bonsai's package source: the same attribute names as the offline set.
# `nixpkgs` is a path to a checkout; `nixpkgsFlake` a flake reference (github:NixOS/nixpkgs/...).
# Other architectures use Nixpkgs' cross package sets (localSystem = the host).
{ nixpkgs ? null, nixpkgsFlake ? null, system, hostSystem }:
let
  src =
    if nixpkgs != null then nixpkgs
    else if nixpkgsFlake != null then (builtins.getFlake nixpkgsFlake).outPath
    else throw "bonsai: source nixpkgs needs --nixpkgs <path or flake reference>";
  pkgs =
    if system == hostSystem then import src { inherit system; }
    else import src { localSystem = hostSystem; crossSystem = system; };
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
