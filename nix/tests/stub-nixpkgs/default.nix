# A stub package set following Nixpkgs' calling convention (`import src { system; }` or
# `{ localSystem; crossSystem; }`), for testing bonsai's Nix glue offline. Its derivations
# record how they were asked for in their names and build nothing of substance.
{ system ? null, localSystem ? null, crossSystem ? null, ... }:
let
  target = if crossSystem != null then crossSystem else system;
  build = if localSystem != null then localSystem else system;
  mk = name: derivation {
    name = "stub-${name}-for-${target}-on-${build}";
    system = build;
    builder = "/bin/sh";
    args = [ "-c" "echo ${name} > $out" ];
  };
in
{
  hello = mk "hello";
  busybox = mk "busybox";
  nested.tool = mk "nested-tool";
  linux = (mk "linux") // { version = "6.1.0"; src = mk "linux-src"; };
  linuxManualConfig = { version, src, configfile, ... }: mk "kernel-${version}";
  stdenv = {
    cc.targetPrefix = if crossSystem != null then "${crossSystem}-" else "";
    mkDerivation = a: mk "${a.name}";
  };
  buildPackages = { stdenv.cc = mk "cc"; flex = null; bison = null; bc = null; perl = null; gnumake = null; };
}
