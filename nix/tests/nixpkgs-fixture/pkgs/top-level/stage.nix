# One package set: packages that run on `hostPlatform`, built on `buildPlatform`, with the
# overlays applied as Nixpkgs applies them (a fixed point; `self` is the final set).
{ lib, config, overlays, crossOverlays, given, buildPlatform, hostPlatform }:
let
  isCross = buildPlatform.config != hostPlatform.config;
  stageFor = host: import ./stage.nix {
    inherit lib config overlays given buildPlatform;
    crossOverlays = [ ];
    hostPlatform = host;
  };
  base = self: import ./all-packages.nix {
    inherit lib config self buildPlatform hostPlatform;
    buildPackages = if isCross then stageFor buildPlatform else self;
    pkgsCross = {
      aarch64-multiplatform = stageFor (lib.systems.elaborate { config = "aarch64-unknown-linux-gnu"; });
      gnu64 = stageFor (lib.systems.elaborate { config = "x86_64-unknown-linux-gnu"; });
    };
    pkgsStatic = if hostPlatform.isStatic then self
      else stageFor (lib.systems.elaborate { system = hostPlatform.system; isStatic = true; });
    fixture = { args = given; inherit isCross; };
  };
in
lib.fix (builtins.foldl' (f: o: lib.extends o f) base (overlays ++ (if isCross then crossOverlays else [ ])))
