# The offline package set: Nixpkgs-shaped derivations built from Debian binary packages.
#
# Arguments (passed by `cargo xtask`, which downloads and verifies the .deb files first):
#   system     the Nix system of the packages ("x86_64-linux", "aarch64-linux")
#   debs       a folder holding <arch>/<file>.deb for every package in ./<arch>.lock.json
#   bootstrap  a folder holding the host's static busybox as `busybox` plus `sh -> busybox`
#   hostTools  PATH of the host toolchain used for C and kernel builds (DESIGN.md: "Host tools
#              come from the OS"); toolchainId names its version so a new compiler rebuilds
{ system ? builtins.currentSystem
, hostSystem ? builtins.currentSystem
, debs
, bootstrap
, hostTools ? "/usr/bin:/bin"
, toolchainId ? "unknown"
, hostShell ? "/bin/sh"
}:
let
  archOf = {
    "x86_64-linux" = { deb = "amd64"; triplet = "x86_64-linux-gnu"; ld = "ld-linux-x86-64.so.2"; kernelArch = "x86_64"; kernelImage = "arch/x86/boot/bzImage"; cross = ""; patchelfFlags = ""; };
    "aarch64-linux" = { deb = "arm64"; triplet = "aarch64-linux-gnu"; ld = "ld-linux-aarch64.so.1"; kernelArch = "arm64"; kernelImage = "arch/arm64/boot/Image"; cross = "aarch64-linux-gnu-";
      # patchelf's default on aarch64 aligns the segments it adds to 64 KiB, which makes every
      # patched program about 130 KiB larger; bonsai's arm64 kernels use 4 KiB pages (asserted in
      # their config fragments: CONFIG_ARM64_4K_PAGES=y).
      patchelfFlags = "--page-size 4096 "; };
  };
  unsupported = s: throw "bonsai offline package set: unsupported system ${s} (supported: ${builtins.concatStringsSep ", " (builtins.attrNames archOf)})";
  target = archOf.${system} or (unsupported system);
  host = archOf.${hostSystem} or (unsupported hostSystem);
  # Cross toolchain prefix: empty when building natively.
  crossPrefix = if system == hostSystem then "" else target.cross;

  # Debian versions without the epoch (store path names cannot hold ':').
  debVersion = v: let m = builtins.match "[0-9]+:(.*)" v; in if m == null then v else builtins.head m;

  lockFor = a: builtins.fromJSON (builtins.readFile (./. + "/${a.deb}.lock.json"));
  targetLock = lockFor target;
  hostLock = lockFor host;

  debFrom = a: lock: name:
    let p = lock.packages.${name} or (throw "bonsai offline package set: Debian package ${name} is not in nix/offline/${a.deb}.lock.json");
    in builtins.path { path = debs + "/${a.deb}/${p.file}"; name = p.file; sha256 = p.sha256; recursive = false; };
  deb = debFrom target targetLock;
  hostDeb = debFrom host hostLock;

  # The host's static busybox, with a link named `sh` so that argv[0] picks the shell applet.
  seed = builtins.path { path = bootstrap; name = "bonsai-bootstrap-seed"; };

  # Every busybox applet as a link: the builders' whole userland.
  tools = derivation {
    name = "bonsai-bootstrap-tools";
    system = hostSystem;
    builder = "${seed}/sh";
    args = [ "-e" "-c" ''
      ${seed}/busybox mkdir -p $out/bin
      ${seed}/busybox cp ${seed}/busybox $out/bin/busybox
      for a in $(${seed}/busybox --list); do
        [ "$a" = busybox ] || ${seed}/busybox ln -s busybox $out/bin/$a
      done
    '' ];
  };

  sh = "${tools}/bin/sh";

  # Builds with the host toolchain run under the host's shell: busybox's shell would prefer its
  # own applets (tar, sed, awk) over the GNU tools that kernel builds expect.
  # Every builder runs on the host (`hostSystem`); `system` only picks the packages' architecture.
  runHost = name: env: script: derivation ({
    inherit name;
    system = hostSystem;
    builder = hostShell;
    args = [ "-e" "-c" script ];
  } // hostBuildEnv // env);

  # A derivation whose builder is a busybox shell script.
  run = name: env: script: derivation ({
    inherit name;
    system = hostSystem;
    builder = sh;
    args = [ "-e" "-c" script ];
    PATH = "${tools}/bin";
  } // env);

  # Lay a Debian package tree out like a Nixpkgs output: usr merged, sbin into bin,
  # lib/<triplet> into lib, absolute symlinks pointed into $out.
  layout = a: ''
    relayout() {
      u=$1
      if [ -d $u/usr ]; then cp -a $u/usr/. $u/; rm -rf $u/usr; fi
      if [ -d $u/sbin ]; then mkdir -p $u/bin; cp -a $u/sbin/. $u/bin/; rm -rf $u/sbin; fi
      if [ -d $u/lib/${a.triplet} ]; then
        # links such as lib/ld-linux-aarch64.so.1 -> ${a.triplet}/ld-linux-aarch64.so.1 give way to their targets
        for l in $u/lib/*; do
          if [ -L "$l" ]; then case "$(readlink "$l")" in ${a.triplet}/*) rm -f "$l" ;; esac; fi
        done
        cp -a $u/lib/${a.triplet}/. $u/lib/; rm -rf $u/lib/${a.triplet}
      fi
      rm -rf $u/lib64
      mkdir -p $out
      cp -a $u/. $out/
      find $out -type l | while read -r l; do
        t=$(readlink "$l")
        case "$t" in
          /*)
            n=$(echo "$t" | sed -e 's|^/usr/|/|' -e 's|^/sbin/|/bin/|' -e 's|^/lib/${a.triplet}/|/lib/|')
            if [ -e "$out$n" ] || [ -L "$out$n" ]; then ln -sfn "$out$n" "$l"; else echo "dropping dangling link $l -> $t"; rm -f "$l"; fi ;;
        esac
      done
    }
  '';

  # Provenance for SBOMs: which Debian packages (version, SHA-256 of the .deb) made an output.
  provenance = lock: names: ''
    mkdir -p $out/nix-support
    ${builtins.concatStringsSep "\n" (map (n: let p = lock.packages.${n}; in "echo '${p.package} ${p.version} ${p.sha256}' >>$out/nix-support/debian-packages") names)}
  '';

  unpackDebs = list: builtins.concatStringsSep "\n" (map (d: "dpkg-deb -x ${d} $TMPDIR/root") list);

  # Point ELF interpreters at the store glibc and RUNPATHs at the package and its dependencies.
  patchElves = { glibc, rpath }: ''
    find $out -type f | while read -r f; do
      [ "$(head -c 4 "$f" | od -An -c | tr -d ' \n')" = '177ELF' ] || continue
      if patchelf --print-interpreter "$f" >/dev/null 2>&1; then
        patchelf ${target.patchelfFlags}--set-interpreter ${glibc}/lib/${target.ld} "$f"
      fi
      if [ -n "$(patchelf --print-needed "$f" 2>/dev/null)" ]; then
        patchelf ${target.patchelfFlags}--set-rpath "${rpath}" "$f"
      fi
    done
  '';

  hostGlibc = run "glibc-${hostLock.packages.libc6.version}" { } ''
    ${layout host}
    ${unpackDebsHost [ "libc6" ]}
    relayout $TMPDIR/root
  '';
  unpackDebsHost = names: unpackDebs (map hostDeb names);

  # Debian's patchelf, run through the host glibc's loader (no patching needed to run it).
  patchelf = run "patchelf-${hostLock.packages.patchelf.version}" { } ''
    ${layout host}
    ${unpackDebsHost [ "patchelf" "libstdc++6" "libgcc-s1" ]}
    relayout $TMPDIR/root
    mv $out/bin/patchelf $out/bin/.patchelf-real
    cat > $out/bin/patchelf <<EOS
    #!${sh}
    exec ${hostGlibc}/lib/${host.ld} --library-path $out/lib:${hostGlibc}/lib $out/bin/.patchelf-real "\$@"
    EOS
    chmod +x $out/bin/patchelf
  '';

  # mkDeb: one Nixpkgs-like package from one or more Debian packages.
  mkDeb = { pname, debNames, deps ? [ ], withGlibc ? true, postInstall ? "" }:
    let
      version = debVersion targetLock.packages.${builtins.head debNames}.version;
      rpathDeps = deps ++ (if withGlibc then [ glibc ] else [ ]);
    in
    run "${pname}-${version}" { PATH = "${tools}/bin:${patchelf}/bin"; } ''
      ${layout target}
      ${unpackDebs (map deb debNames)}
      relayout $TMPDIR/root
      ${provenance targetLock debNames}
      ${postInstall}
      ${if withGlibc then patchElves { inherit glibc; rpath = builtins.concatStringsSep ":" ([ "$out/lib" ] ++ map (d: "${d}/lib") rpathDeps); } else ""}
    '' // { inherit pname version; meta.debian = map (n: { name = n; inherit (targetLock.packages.${n}) version sha256; }) debNames; };

  glibc = run "glibc-${targetLock.packages.libc6.version}" { } ''
    ${layout target}
    ${unpackDebs [ (deb "libc6") ]}
    relayout $TMPDIR/root
    ${provenance targetLock [ "libc6" ]}
  '' // { pname = "glibc"; version = targetLock.packages.libc6.version; };

  busybox = mkDeb { pname = "busybox"; debNames = [ "busybox-static" ]; withGlibc = false; postInstall = ''
    # Nixpkgs' busybox output has bin/busybox plus one link per applet.
    for a in $($out/bin/busybox --list 2>/dev/null || ${tools}/bin/busybox --list); do
      [ -e $out/bin/$a ] || ln -s busybox $out/bin/$a
    done
  ''; };

  skalibs = mkDeb { pname = "skalibs"; debNames = [ "libskarnet2.13" ]; };
  execline = mkDeb { pname = "execline"; debNames = [ "execline" "libexecline2.9" ]; deps = [ skalibs ]; };
  s6 = mkDeb { pname = "s6"; debNames = [ "s6" "libs6-2.11" ]; deps = [ execline skalibs ]; };
  runit = mkDeb { pname = "runit"; debNames = [ "runit" ]; postInstall = ''
    # Nixpkgs' runit has runit-init in bin/.
    ln -s ../lib/runit/runit-init $out/bin/runit-init
  ''; };
  zlib = mkDeb { pname = "zlib"; debNames = [ "zlib1g" ]; };
  libxcrypt = mkDeb { pname = "libxcrypt"; debNames = [ "libcrypt1" ]; };
  libtommath = mkDeb { pname = "libtommath"; debNames = [ "libtommath1" ]; };
  gmp = mkDeb { pname = "gmp"; debNames = [ "libgmp10" ]; };
  libtomcrypt = mkDeb { pname = "libtomcrypt"; debNames = [ "libtomcrypt1" ]; deps = [ libtommath gmp ]; };
  dropbear = mkDeb { pname = "dropbear"; debNames = [ "dropbear-bin" ]; deps = [ zlib libxcrypt libtomcrypt libtommath gmp ]; };

  kernelSource = run "linux-${targetLock.packages.linux-source.version}.tar.xz" { } ''
    dpkg-deb -x ${deb "linux-source"} $TMPDIR/root
    cp $TMPDIR/root/usr/src/linux-source-*.tar.xz $out
  '';

  # The prebuilt distribution kernel (Debian's cloud flavour): $out/<image>, modules, config, dtbs.
  linux = run "linux-${targetLock.packages.linux-image.version}" { } ''
    dpkg-deb -x ${deb "linux-image"} $TMPDIR/root
    mkdir -p $out
    cp $TMPDIR/root/boot/vmlinuz-* $out/${builtins.baseNameOf target.kernelImage}
    cp $TMPDIR/root/boot/config-* $out/config
    if [ -d $TMPDIR/root/lib/modules ]; then mkdir -p $out/lib; cp -a $TMPDIR/root/lib/modules $out/lib/; fi
    # device trees (arm64), where Nixpkgs' kernels keep them: $out/dtbs/<vendor>/<board>.dtb
    for d in $TMPDIR/root/usr/lib/linux-image-*; do if [ -d "$d" ]; then cp -a "$d" $out/dtbs; fi; done
  '' // {
    pname = "linux";
    version = builtins.head (builtins.match "([^-]+)-.*" targetLock.packages.linux-source.version);
    src = kernelSource;
    kernelImage = builtins.baseNameOf target.kernelImage;
  };

  # Kernel builds use the host's C toolchain; the store path changes with toolchainId.
  hostBuildEnv = {
    PATH = "${hostTools}:${tools}/bin";
    inherit toolchainId;
    KBUILD_BUILD_TIMESTAMP = "1970-01-01";
    KBUILD_BUILD_USER = "bonsai";
    KBUILD_BUILD_HOST = "bonsai";
    SOURCE_DATE_EPOCH = "1";
  };

  # Device trees, like Nixpkgs' kernels: $out/dtbs/<vendor>/<board>.dtb for the platforms the
  # config enables (arm64 only; nothing is added to x86 builds, whose derivations stay as they were).
  dtbsInstall = if target.kernelArch != "arm64" then "" else ''

      if grep -q '^CONFIG_OF=y' .config; then
        make ARCH=${target.kernelArch} CROSS_COMPILE=${crossPrefix} -j''${NIX_BUILD_CORES:-2} dtbs
        make ARCH=${target.kernelArch} CROSS_COMPILE=${crossPrefix} INSTALL_DTBS_PATH=$out/dtbs dtbs_install
      fi'';

  # Nixpkgs' linuxManualConfig (pkgs/os-specific/linux/kernel/build.nix): the same argument set,
  # with no `...`, the same outputs (out, dev, and modules only when `config` says the kernel is
  # modular) and the same passthru. `config` is read from `configfile` only when that is a path
  # or `allowImportFromDerivation` is set, exactly as Nixpkgs does: bonsai passes a derivation
  # output, so nothing is read during evaluation.
  readKernelConfig = configfile: builtins.listToAttrs (builtins.concatMap (line:
      let m = builtins.match "(CONFIG_[^=]+)=([ym])" line; in
      if m == null then [ ] else [ { name = builtins.elemAt m 0; value = builtins.elemAt m 1; } ])
    (builtins.filter builtins.isString (builtins.split "\n" (builtins.readFile configfile))));
  padVersion = v: let parts = builtins.filter builtins.isString (builtins.split "\\." v);
    in builtins.concatStringsSep "." (parts ++ builtins.genList (_: "0") (3 - builtins.length parts));
  linuxManualConfig =
    { version
    , pname ? "linux"
    , pos ? null
    , extraMakeFlags ? [ ]
    , modDirVersion ? null
    , src
    , kernelPatches ? [ ]
    , configfile
    , target ? builtins.baseNameOf targetArch.kernelImage
    , buildDTBs ? targetArch.kernelArch == "arm64"
    , config ? (if builtins.isPath configfile || allowImportFromDerivation then readKernelConfig configfile else { })
    , randstructSeed ? ""
    , extraMeta ? { }
    , isZen ? false
    , allowImportFromDerivation ? false
    , features ? { }
    , lib ? null
    , stdenv ? null
    }:
    let
      modDir = if modDirVersion == null then padVersion version else modDirVersion;
      isModular = (config.CONFIG_MODULES or null) == "y";
      make = "make ARCH=${targetArch.kernelArch} CROSS_COMPILE=${crossPrefix} ${builtins.concatStringsSep " " extraMakeFlags}";
      drv = runHost "${pname}-${version}" {
        inherit src configfile;
        outputs = [ "out" "dev" ] ++ (if isModular then [ "modules" ] else [ ]);
      } ''
        mkdir -p $TMPDIR/src && cd $TMPDIR/src
        tar -xf $src --strip-components=1
        cp $configfile .config
        chmod u+w .config
        ${make} olddefconfig >/dev/null
        release=$(${make} -s kernelrelease)
        if [ "$release" != "${modDir}" ]; then
          echo "Error: modDirVersion ${modDir} specified in the Nix expression is wrong, it should be: $release"
          exit 1
        fi
        ${make} -j''${NIX_BUILD_CORES:-2} ${target}
        mkdir -p $out $dev
        cp ${kernelImagePath target} $out/
        cp System.map $out/
        cp vmlinux $dev/
        ${if buildDTBs then ''
        if grep -q '^CONFIG_OF=y' .config; then
          ${make} -j''${NIX_BUILD_CORES:-2} dtbs
          ${make} INSTALL_DTBS_PATH=$out/dtbs dtbs_install
        fi'' else ""}
        ${if isModular then ''
        ${make} -j''${NIX_BUILD_CORES:-2} modules
        ${make} INSTALL_MOD_PATH=$modules INSTALL_MOD_STRIP=1 modules_install
        rm -f $modules/lib/modules/*/build $modules/lib/modules/*/source'' else ""}
      '';
    in
    drv // {
      inherit pname version;
      modDirVersion = modDir;
      passthru = { inherit version config kernelPatches configfile target buildDTBs isZen features; modDirVersion = modDir; };
      inherit config kernelPatches configfile target buildDTBs isZen features;
      meta = { description = "The Linux kernel"; } // extraMeta;
    };
  # The target arch record under another name: linuxManualConfig has an argument called `target`.
  targetArch = target;
  kernelImagePath = t: "arch/${if target.kernelArch == "x86_64" then "x86" else target.kernelArch}/boot/${t}";

  # A team's own program: C, built with -g (unstripped), dynamically linked to the store glibc.
  # The interpreter and RUNPATH are set at link time (the compiler's own C library only serves
  # the link): patchelf on an aarch64 binary appends 64 KiB-aligned segments after the debug
  # sections, a layout that in-process stripping cannot shrink.
  hello = runHost "hello-1.0" { src = ./src/hello.c; } ''
    mkdir -p $out/bin
    ${crossPrefix}gcc -g -O2 -Wl,--dynamic-linker=${glibc}/lib/${target.ld} -Wl,-rpath,${glibc}/lib -o $out/bin/hello $src
  '' // { pname = "hello"; version = "1.0"; };
in
{
  inherit glibc busybox skalibs execline s6 runit zlib libxcrypt libtommath libtomcrypt gmp dropbear linux linuxManualConfig hello;
  # Tools for bonsai's own glue (kernel configs): the bootstrap userland and the host toolchain.
  bonsai = {
    inherit tools patchelf;
    kernelArch = target.kernelArch;
    mkKernelConfig = { src, version, base, fragments, script }:
      runHost "linux-config-${version}" ({
        inherit src base;
        fragments = builtins.concatStringsSep " " (map toString fragments);
        kernelArch = target.kernelArch;
        inherit crossPrefix;
      }) "sh ${script}";
  };
}
