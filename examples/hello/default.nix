# A team's own C program, packaged for bonsai: profiles name it in [local-packages]
#   [local-packages]
#   hello = "examples/hello/default.nix"
# and then in `packages`. The file is called with `callPackage` from the package set in use
# (the offline set or real Nixpkgs), so the same expression builds for every board: `cc`
# compiles for the board's architecture and links against that set's glibc.
{ stdenv }:
stdenv.mkDerivation {
  pname = "hello";
  version = "1.0";
  src = ./src;
  # -g: kept unstripped in the store; bonsai strips it in the image (the tests check that).
  # Compiled from $src, so its debug info names the source's store path (which stripping drops).
  buildPhase = "cc -g -O2 -o hello $src/hello.c";
  installPhase = "mkdir -p $out/bin && cp hello $out/bin/";
  dontStrip = true;
}
