# lib.systems.elaborate, for the platforms bonsai uses: a system string ("aarch64-linux"), a
# config triple ("aarch64-unknown-linux-gnu") or an attribute set with `system` or `config`.
# `crossSystem = "aarch64-linux"` elaborates to the same platform as pkgsCross.aarch64-multiplatform.
arg:
let
  known = {
    "x86_64-linux" = {
      system = "x86_64-linux";
      config = "x86_64-unknown-linux-gnu";
      isx86_64 = true;
      isAarch64 = false;
      # Debian's name for the same toolchain (the fixture's compilers are the host's).
      debianTriplet = "x86_64-linux-gnu";
      dynamicLinker = "ld-linux-x86-64.so.2";
      linuxArch = "x86_64";
      linux-kernel = { name = "pc"; target = "bzImage"; DTB = false; };
    };
    "aarch64-linux" = {
      system = "aarch64-linux";
      config = "aarch64-unknown-linux-gnu";
      isx86_64 = false;
      isAarch64 = true;
      debianTriplet = "aarch64-linux-gnu";
      dynamicLinker = "ld-linux-aarch64.so.1";
      linuxArch = "arm64";
      linux-kernel = { name = "aarch64-multiplatform"; target = "Image"; DTB = true; };
    };
  };
  byConfig = {
    "x86_64-unknown-linux-gnu" = "x86_64-linux";
    "aarch64-unknown-linux-gnu" = "aarch64-linux";
  };
  name =
    if builtins.isString arg then (byConfig.${arg} or arg)
    else if arg ? system then arg.system
    else if arg ? config then (byConfig.${arg.config} or arg.config)
    else throw "nixpkgs fixture: cannot elaborate a platform without `system` or `config`";
  isStatic = builtins.isAttrs arg && (arg.isStatic or false);
  base = known.${name} or (throw "nixpkgs fixture: unsupported platform ${name} (the fixture knows ${builtins.concatStringsSep ", " (builtins.attrNames known)})");
in
base // {
  inherit isStatic;
  libc = if isStatic then "musl" else "glibc";
  config = if isStatic then builtins.replaceStrings [ "-gnu" ] [ "-musl" ] base.config else base.config;
  isLinux = true;
  parsed.cpu.name = builtins.head (builtins.split "-" base.system);
}
