# The top-level arguments exactly as Nixpkgs takes them (pkgs/top-level/impure.nix): a
# `localSystem` (or the older `system`), a `crossSystem`, `config`, `overlays`, `crossOverlays`.
# Where Nixpkgs would read the user's ~/.config/nixpkgs (no `config` or `overlays` given), the
# fixture refuses: bonsai must always pass both. What it was given is kept in `fixture.args`.
{ localSystem ? { system = args.system or builtins.currentSystem; }
, system ? null
, crossSystem ? localSystem
, config ? throw "nixpkgs fixture: imported without `config`; real Nixpkgs would read ~/.config/nixpkgs/config.nix and NIXPKGS_CONFIG (impure): pass config = { }"
, overlays ? throw "nixpkgs fixture: imported without `overlays`; real Nixpkgs would read ~/.config/nixpkgs/overlays (impure): pass overlays = [ ]"
, crossOverlays ? [ ]
}@args:
let
  lib = import ../../lib;
  local = lib.systems.elaborate localSystem;
  cross = lib.systems.elaborate crossSystem;
  # The two must be given, even when empty; forcing them here makes an impure import fail at once.
  checked = builtins.seq config (builtins.seq overlays true);
  given = {
    inherit config;
    overlays = builtins.length overlays;
    crossOverlays = builtins.length crossOverlays;
    localSystem = local.system;
    crossSystem = if local.config == cross.config then null else cross.config;
    usedSystemArgument = args ? system;
  };
in
assert checked;
import ./stage.nix {
  inherit lib config overlays crossOverlays given;
  buildPlatform = local;
  hostPlatform = cross;
}
