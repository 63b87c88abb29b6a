# The fixture's packages, with the outputs, output order and layout of the Nixpkgs attributes
# they stand for (see README.md), built from tiny C sources with
# the host's C compiler so that a whole board builds offline in seconds.
{ lib, config, self, buildPlatform, hostPlatform, buildPackages, pkgsCross, pkgsStatic, fixture }:
let
  isCross = buildPlatform.config != hostPlatform.config;
  targetPrefix = if isCross then "${hostPlatform.config}-" else "";
  # The host program that compiles for hostPlatform (Debian's names).
  hostGcc = if hostPlatform.system == buildPlatform.system then "gcc" else "${hostPlatform.debianTriplet}-gcc";
  hostPath = "/usr/bin:/bin";

  # A derivation run by /bin/sh on the build machine with the host's tools (no sandbox).
  runCommand = name: env: script: derivation ({
    inherit name;
    system = buildPlatform.system;
    builder = "/bin/sh";
    args = [ "-e" "-c" script ];
    PATH = hostPath;
  } // env);

  # Links to host programs, as a package with bin/ (Nixpkgs' gnumake, flex, ...).
  hostTool = pname: programs: runCommand "${pname}-host" { } ''
    mkdir -p $out/bin
    for p in ${lib.concatStringsSep " " programs}; do
      if command -v $p >/dev/null; then ln -s "$(command -v $p)" $out/bin/$p; fi
    done
  '' // { inherit pname; };

  # The C library for hostPlatform: the host toolchain's own, laid out like Nixpkgs' glibc.
  glibc = runCommand "glibc-2.40-66" {
    outputs = [ "out" "bin" "dev" "static" "getent" ];
  } ''
    mkdir -p $out/lib $bin/bin $dev/include $static/lib $getent/bin
    if ! command -v ${hostGcc} >/dev/null; then echo "nixpkgs fixture: the host has no ${hostGcc}"; exit 1; fi
    cp -L "$(${hostGcc} -print-file-name=libc.so.6)" $out/lib/libc.so.6
    cp -L "$(${hostGcc} -print-file-name=${hostPlatform.dynamicLinker})" $out/lib/${hostPlatform.dynamicLinker}
    chmod u+w $out/lib/*
    ln -s lib $out/lib64
    printf '#!/bin/sh\necho "ldd (fixture) 2.40"\n' >$bin/bin/ldd
    printf '#!/bin/sh\necho "getent (fixture)"\n' >$getent/bin/getent
    chmod +x $bin/bin/ldd $getent/bin/getent
    echo '/* fixture */' >$dev/include/stdio.h
    : >$static/lib/libc.a
  '' // { pname = "glibc"; version = "2.40-66"; };

  # The compiler for hostPlatform, like Nixpkgs' cc-wrapper: ${targetPrefix}cc and gcc, which
  # link against the set's C library (its loader as interpreter, its lib/ in the RUNPATH).
  cc = runCommand "${targetPrefix}gcc-wrapper-14.3.0" {
    libc = if hostPlatform.isStatic then "" else glibc;
  } ''
    mkdir -p $out/bin
    real=$(command -v ${hostGcc} || echo "")
    for n in ${targetPrefix}cc ${targetPrefix}gcc; do
      cat >$out/bin/$n <<EOS
    #!/bin/sh
    [ -n "$real" ] || { echo "nixpkgs fixture: the host has no ${hostGcc}" >&2; exit 1; }
    link=exe
    for a in "\$@"; do case "\$a" in -c|-S|-E|-M|-MM) link= ;; -shared) [ -z "\$link" ] || link=shared ;; esac; done
    ${if hostPlatform.isStatic then ''
    [ -z "\$link" ] || set -- -static "\$@"
    '' else ''
    [ "\$link" != exe ] || set -- -Wl,--dynamic-linker=$libc/lib/${hostPlatform.dynamicLinker} "\$@"
    [ -z "\$link" ] || set -- -Wl,-rpath,$libc/lib "\$@"
    ''}
    exec $real "\$@"
    EOS
      chmod +x $out/bin/$n
    done
  '' // {
    inherit targetPrefix;
    libc = glibc;
    isGNU = true;
    # The unwrapped compiler (Nixpkgs' kernels build with stdenv.cc.cc).
    cc = hostTool "gcc" [ hostGcc ];
  };

  stdenv = {
    inherit cc buildPlatform hostPlatform;
    targetPlatform = hostPlatform;
    system = hostPlatform.system;
    isLinux = true;
    shell = "/bin/sh";
    mkDerivation = mkDerivation;
  };

  # stdenv.mkDerivation: pname/version (or name), src, phases, outputs (the first is what
  # nix-build prints), passthru (merged into the result) and meta; build inputs on PATH.
  mkDerivation = attrs:
    let
      name = attrs.name or "${attrs.pname}-${attrs.version}";
      outputs = attrs.outputs or [ "out" ];
      passthru = attrs.passthru or { };
      inputs = (attrs.depsBuildBuild or [ ]) ++ (attrs.nativeBuildInputs or [ ])
        ++ (attrs.buildInputs or [ ]) ++ (attrs.propagatedBuildInputs or [ ]);
      drv = derivation ((removeAttrs attrs [ "passthru" "meta" "pos" ]) // {
        inherit name outputs;
        system = buildPlatform.system;
        builder = "/bin/sh";
        args = [ "-e" ../stdenv/setup.sh ];
        fixturePath = "${lib.makeBinPath (inputs ++ [ cc ])}:${hostPath}";
        CC = "${targetPrefix}cc";
      });
    in
    drv // passthru // { inherit passthru; meta = attrs.meta or { }; }
      // lib.optionalAttrs (attrs ? pname) { inherit (attrs) pname; }
      // lib.optionalAttrs (attrs ? version) { inherit (attrs) version; };

  # callPackage: a function (or a file holding one) called with the arguments it names from the
  # set; newScope: a callPackage that also sees `extra` (Nixpkgs' lib.callPackageWith).
  # Like Nixpkgs, the result is overridable (lib.makeOverridable).
  callPackageWith = scope: fn: args:
    let f = if builtins.isFunction fn then fn else import fn;
    in lib.makeOverridable f (builtins.intersectAttrs (builtins.functionArgs f) scope // args);
  callPackage = callPackageWith self;
  newScope = extra: callPackageWith (self // extra);

  runtimeShell = "${self.busybox}/bin/sh";
  src = ../../src;

  # Nixpkgs' busybox: out only; bin/busybox plus a link per applet in bin/ and sbin/ (relative,
  # as busybox's own install makes them); dynamic against glibc unless the set is static.
  sbinApplets = [ "ip" "sysctl" "init" "poweroff" "reboot" "halt" "ifconfig" "route" "udhcpc" "mdev" "modprobe" "switch_root" "klogd" "syslogd" ];
  binApplets = [ "sh" "ash" "cat" "chmod" "cp" "cut" "date" "dmesg" "echo" "env" "false" "grep" "head" "hostname" "kill" "ln" "ls" "mkdir" "mknod" "mount" "mv" "ps" "readlink" "rm" "sed" "sleep" "sort" "su" "sync" "tail" "tee" "test" "touch" "tr" "true" "umount" "uname" "wc" ];
  busybox = mkDerivation {
    pname = if hostPlatform.isStatic then "busybox-static-${hostPlatform.config}" else "busybox";
    version = "1.36.1";
    inherit src;
    buildPhase = ''
      $CC -O2 -s -DAPPLETS='"${lib.concatStringsSep " " (binApplets ++ sbinApplets)}"' -o busybox busybox.c
    '';
    installPhase = ''
      mkdir -p $out/bin $out/sbin
      cp busybox $out/bin/busybox
      for a in ${lib.concatStringsSep " " binApplets}; do ln -s busybox $out/bin/$a; done
      for a in ${lib.concatStringsSep " " sbinApplets}; do ln -s ../bin/busybox $out/sbin/$a; done
    '';
  };

  # GNU hello: out only, bin/hello, already stripped.
  hello = mkDerivation {
    pname = "hello";
    version = "2.12.2";
    inherit src;
    buildPhase = "$CC -O2 -s -o hello hello.c";
    installPhase = "mkdir -p $out/bin && cp hello $out/bin/";
  };

  # A library named like systemd's, and a `ps` that links it unless `withSystemd = false`, the
  # switch Nixpkgs' procps has: the case a profile's `forbid` and `[overrides.procps]` solve.
  systemd = mkDerivation {
    pname = "systemd";
    version = "257.6";
    inherit src;
    buildPhase = "$CC -O2 -fPIC -shared -Wl,-soname,libsystemd.so.0 -o libsystemd.so.0.40.0 systemd.c";
    installPhase = "mkdir -p $out/lib && cp libsystemd.so.0.40.0 $out/lib/ && ln -s libsystemd.so.0.40.0 $out/lib/libsystemd.so.0";
  };
  procps = callPackage ({ stdenv, systemd, withSystemd ? true }: stdenv.mkDerivation {
    pname = "procps";
    version = "4.0.4";
    inherit src;
    buildPhase = if withSystemd
      then "$CC -O2 -DWITH_SYSTEMD -o ps ps.c -L${systemd}/lib -Wl,-rpath,${systemd}/lib -l:libsystemd.so.0"
      else "$CC -O2 -o ps ps.c";
    installPhase = "mkdir -p $out/bin && cp ps $out/bin/";
  }) { };

  # skalibs: outputs lib dev doc out (the first is lib); no programs; libskarnet in lib/lib,
  # the sysdeps in out/lib/skalibs (where s6 and execline builds find them).
  skalibs = mkDerivation {
    pname = "skalibs";
    version = "2.14.4.0";
    outputs = [ "lib" "dev" "doc" "out" ];
    inherit src;
    buildPhase = "$CC -O2 -fPIC -shared -Wl,-soname,libskarnet.so.2.14 -o libskarnet.so.2.14.4.0 skarnet.c";
    installPhase = ''
      mkdir -p $lib/lib $dev/include/skalibs $dev/lib $doc/share/doc/skalibs $out/lib/skalibs/sysdeps
      cp libskarnet.so.2.14.4.0 $lib/lib/
      ln -s libskarnet.so.2.14.4.0 $lib/lib/libskarnet.so.2.14
      ln -s $lib/lib/libskarnet.so.2.14.4.0 $dev/lib/libskarnet.so
      cp skalibs.h $dev/include/skalibs/
      echo '<html>skalibs (fixture)</html>' >$doc/share/doc/skalibs/index.html
      echo 'target: ${hostPlatform.config}' >$out/lib/skalibs/sysdeps/sysdeps
    '';
  };

  # execline: outputs bin man lib dev doc out (the first is bin); programs in bin/bin, where
  # execlineb is a wrapper around .execlineb-wrapped; libexecline in lib/lib, linked to skalibs.
  execline = mkDerivation {
    pname = "execline";
    version = "2.9.6.1";
    outputs = [ "bin" "man" "lib" "dev" "doc" "out" ];
    inherit src;
    buildPhase = ''
      $CC -O2 -fPIC -shared -Wl,-soname,libexecline.so.2.9 -I${skalibs.dev}/include \
        -L${skalibs.lib}/lib -Wl,-rpath,${skalibs.lib}/lib -o libexecline.so.2.9.6.1 execline-lib.c -l:libskarnet.so.2.14
      ln -s libexecline.so.2.9.6.1 libexecline.so.2.9
      for p in execlineb execline-cd; do
        $CC -O2 -DPROG="\"$p\"" -L. -L${skalibs.lib}/lib -Wl,-rpath,$lib/lib:${skalibs.lib}/lib \
          -o $p execline-prog.c -l:libexecline.so.2.9 -l:libskarnet.so.2.14
      done
    '';
    installPhase = ''
      mkdir -p $bin/bin $lib/lib $dev/include/execline $man/share/man/man1 $doc/share/doc/execline $out/nix-support
      cp libexecline.so.2.9.6.1 $lib/lib/ && ln -s libexecline.so.2.9.6.1 $lib/lib/libexecline.so.2.9
      cp execline-cd $bin/bin/
      cp execlineb $bin/bin/.execlineb-wrapped
      printf '#!%s\nPATH=%s/bin:$PATH exec -a "$0" %s/bin/.execlineb-wrapped "$@"\n' ${runtimeShell} $bin $bin >$bin/bin/execlineb
      chmod +x $bin/bin/execlineb
      echo '/* fixture */' >$dev/include/execline/execline.h
      echo '.TH EXECLINEB 1' >$man/share/man/man1/execlineb.1
      echo '<html>execline (fixture)</html>' >$doc/share/doc/execline/index.html
      echo "$bin $lib" >$out/nix-support/propagated-user-env-packages
    '';
  };

  # A fake kernel tree with the make targets bonsai's glue and linuxManualConfig call
  # (configs, kernelrelease, the image, dtbs) that compiles nothing: see linux-tree/Makefile.
  linuxVersion = "6.12.41";
  linuxSrc = runCommand "linux-${linuxVersion}.tar" { tree = ../../linux-tree; } ''
    mkdir -p t && cp -r $tree t/linux-${linuxVersion} && chmod -R u+w t
    sed -i 's/^KERNELRELEASE := .*/KERNELRELEASE := ${linuxVersion}/' t/linux-${linuxVersion}/Makefile
    tar -C t --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner -cf $out linux-${linuxVersion}
  '';

  # pkgs/os-specific/linux/kernel/build.nix: the argument set (no `...`), out and dev outputs
  # (and modules for a modular config), `config` read from `configfile` only when it is a path
  # or allowImportFromDerivation is set, the modDirVersion check, passthru.
  readConfig = configfile: builtins.listToAttrs (builtins.concatMap (line:
      let m = builtins.match "(CONFIG_[^=]+)=(.*)" line; in
      if m == null then [ ] else [ { name = builtins.elemAt m 0; value = builtins.elemAt m 1; } ])
    (builtins.filter builtins.isString (builtins.split "\n" (builtins.readFile configfile))));
  padVersion = v: let parts = builtins.filter builtins.isString (builtins.split "\\." v);
    in lib.concatStringsSep "." (parts ++ builtins.genList (_: "0") (3 - builtins.length parts));
  linuxManualConfig =
    { version
    , pname ? "linux"
    , pos ? null
    , extraMakeFlags ? [ ]
    , modDirVersion ? null
    , src
    , kernelPatches ? [ ]
    , configfile
    , target ? hostPlatform.linux-kernel.target
    , buildDTBs ? hostPlatform.linux-kernel.DTB
    , config ? (if builtins.isPath configfile || allowImportFromDerivation then readConfig configfile else { })
    , randstructSeed ? ""
    , extraMeta ? { }
    , isZen ? false
    , allowImportFromDerivation ? false
    , features ? { }
    , lib ? self.lib
    , stdenv ? self.stdenv
    }:
    let
      modDir = if modDirVersion == null then padVersion version else modDirVersion;
      isModular = (config.CONFIG_MODULES or null) == "y";
      make = "make ARCH=${hostPlatform.linuxArch} CROSS_COMPILE=${stdenv.cc.targetPrefix} ${lib.concatStringsSep " " extraMakeFlags}";
      passthru = { inherit version config kernelPatches configfile target buildDTBs isZen features isModular; modDirVersion = modDir; };
    in
    stdenv.mkDerivation {
      inherit pname version src configfile passthru;
      outputs = [ "out" "dev" ] ++ lib.optional isModular "modules";
      depsBuildBuild = [ buildPackages.stdenv.cc ];
      nativeBuildInputs = with buildPackages; [ flex bison bc perl gnumake ];
      configurePhase = ''
        cp $configfile .config
        chmod u+w .config
        ${make} olddefconfig
        release=$(${make} -s kernelrelease)
        if [ "$release" != "${modDir}" ]; then
          echo "Error: modDirVersion ${modDir} specified in the Nix expression is wrong, it should be: $release"
          exit 1
        fi
      '';
      buildPhase = "${make} ${target}" + lib.optionalString buildDTBs " dtbs" + lib.optionalString isModular " modules";
      installPhase = ''
        mkdir -p $out $dev
        cp arch/${if hostPlatform.linuxArch == "x86_64" then "x86" else hostPlatform.linuxArch}/boot/${target} $out/
        cp System.map $out/
        cp vmlinux $dev/
        ${lib.optionalString buildDTBs "${make} INSTALL_DTBS_PATH=$out/dtbs dtbs_install"}
        ${lib.optionalString isModular "${make} INSTALL_MOD_PATH=$modules modules_install"}
      '';
      meta = { description = "The Linux kernel (bonsai fixture: not bootable)"; } // extraMeta;
    };

  # A prebuilt kernel, as Nixpkgs' `linux` (version, src, modDirVersion, the config it was built with).
  linux = linuxManualConfig {
    version = linuxVersion;
    src = linuxSrc;
    configfile = ../../linux-tree/defconfig;
  };
in
{
  inherit lib config stdenv buildPackages pkgsCross pkgsStatic fixture callPackage newScope runtimeShell runCommand;
  inherit glibc busybox hello skalibs execline linux linuxManualConfig systemd procps;
  # Build tools, as Nixpkgs names them (the host's programs).
  gnumake = hostTool "gnumake" [ "make" ];
  flex = hostTool "flex" [ "flex" ];
  bison = hostTool "bison" [ "bison" ];
  bc = hostTool "bc" [ "bc" ];
  perl = hostTool "perl" [ "perl" ];
  nested.tool = hello;
  # For tests: a derivation whose evaluation reads its own output (import from derivation).
  fixtureIfd = import (runCommand "fixture-ifd.nix" { } "echo '{ ifd = true; }' >$out");
}
