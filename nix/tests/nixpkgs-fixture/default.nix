# bonsai's Nixpkgs fixture: a package set with Nixpkgs' calling conventions and output shapes,
# small enough to build offline in seconds (see README.md). Like Nixpkgs' own default.nix, it
# checks the minimum Nix first and aborts below it; lib/minfeatures.nix has Nixpkgs' shape.
let
  minfeatures = import ./lib/minfeatures.nix;
in
if minfeatures.missing != [ ] then
  abort ("This version of the bonsai Nixpkgs fixture requires Nix >= ${minfeatures.minVersion}, please upgrade:"
    + builtins.concatStringsSep "" (map (f: "\n- ${f.description}") minfeatures.missing))
else
  import ./pkgs/top-level/impure.nix
