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
  # Overlays (`final: prev: { ... }`, functions or files holding one), applied in order.
, overlays ? [ ]
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

  # Debian versions without the epoch, and '~' (a backport's or stable update's) as '_': store
  # path names cannot hold ':' or '~'.
  storeSafe = builtins.replaceStrings [ "~" ] [ "_" ];
  debVersion = v: let m = builtins.match "[0-9]+:(.*)" v; in storeSafe (if m == null then v else builtins.head m);

  lockFor = a: builtins.fromJSON (builtins.readFile (./. + "/${a.deb}.lock.json"));
  targetLock = lockFor target;
  hostLock = lockFor host;

  debFrom = a: lock: name:
    let p = lock.packages.${name} or (throw "bonsai offline package set: Debian package ${name} is not in nix/offline/${a.deb}.lock.json");
    in builtins.path { path = debs + "/${a.deb}/${p.file}"; name = storeSafe p.file; sha256 = p.sha256; recursive = false; };
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

  # Lay a Debian package tree out like a Nixpkgs output: usr merged, `sbin/` kept as `sbin/`
  # (Nixpkgs' busybox and dropbear have one), lib/<triplet> into lib. The tree goes to $2
  # (default $out); absolute symlinks are pointed into $out, or, with a staging folder as $2,
  # marked `@stage@/...` for `fixlinks` once every file is in its output.
  layout = a: ''
    relayout() {
      u=$1
      dest=''${2:-$out}
      if [ -d $u/usr ]; then cp -a $u/usr/. $u/; rm -rf $u/usr; fi
      if [ -d $u/lib/${a.triplet} ]; then
        # links such as lib/ld-linux-aarch64.so.1 -> ${a.triplet}/ld-linux-aarch64.so.1 give way to their targets
        for l in $u/lib/*; do
          if [ -L "$l" ]; then case "$(readlink "$l")" in ${a.triplet}/*) rm -f "$l" ;; esac; fi
        done
        cp -a $u/lib/${a.triplet}/. $u/lib/; rm -rf $u/lib/${a.triplet}
      fi
      rm -rf $u/lib64
      mkdir -p $dest
      cp -a $u/. $dest/
      if [ "$dest" = "$out" ]; then to=$out; else to=@stage@; fi
      find $dest -type l | while read -r l; do
        t=$(readlink "$l")
        case "$t" in
          /*)
            n=$(echo "$t" | sed -e 's|^/usr/|/|' -e 's|^/lib/${a.triplet}/|/lib/|')
            if [ -e "$dest$n" ] || [ -L "$dest$n" ]; then ln -sfn "$to$n" "$l"; else echo "dropping dangling link $l -> $t"; rm -f "$l"; fi ;;
        esac
      done
    }
  '';

  # Moving a staged package tree into Nixpkgs' outputs ($outputs, each output's path in the
  # variable of its name). `to <output> <glob>...` moves what matches (paths relative to the
  # stage); `rest <output>` moves everything left; `fixlinks` turns `@stage@/...` links into
  # store paths of whichever output now holds the target.
  splitting = ''
    stage=$TMPDIR/stage
    outdir() { eval echo "\$$1"; }
    to() {
      d=$(outdir $1); shift
      for p in "$@"; do
        for f in $stage/$p; do
          if [ -e "$f" ] || [ -L "$f" ]; then
            r=''${f#$stage/}
            mkdir -p "$d/$(dirname "$r")"
            mv "$f" "$d/$r"
          fi
        done
      done
    }
    rest() {
      d=$(outdir $1)
      find $stage -depth -type d | while read -r e; do rmdir "$e" 2>/dev/null || true; done
      mkdir -p $d
      if [ -d $stage ]; then cp -a $stage/. $d/; rm -rf $stage; fi
    }
    fixlinks() {
      for o in $outputs; do
        find $(outdir $o) -type l | while read -r l; do
          t=$(readlink "$l")
          case "$t" in
            @stage@/*)
              n=''${t#@stage@}
              found=
              for o2 in $outputs; do
                d2=$(outdir $o2)
                if [ -z "$found" ] && { [ -e "$d2$n" ] || [ -L "$d2$n" ]; }; then found=$d2$n; fi
              done
              if [ -n "$found" ]; then ln -sfn "$found" "$l"; else echo "dropping dangling link $l -> $n"; rm -f "$l"; fi ;;
          esac
        done
      done
    }
    alloutputs() { for o in $outputs; do outdir $o; done; }
  '';

  # Provenance for SBOMs: which Debian packages (version, SHA-256 of the .deb) made an output;
  # written into every output, since each is a store path of its own in the image.
  provenance = lock: names: ''
    for d in $(alloutputs); do
      mkdir -p $d/nix-support
      ${builtins.concatStringsSep "\n" (map (n: let p = lock.packages.${n}; in "echo '${p.package} ${p.version} ${p.sha256}' >>$d/nix-support/debian-packages") names)}
    done
  '';

  unpackDebs = list: builtins.concatStringsSep "\n" (map (d: "dpkg-deb -x ${d} $TMPDIR/root") list);

  # Point ELF interpreters at the store glibc and RUNPATHs at the package and its dependencies.
  patchElves = { glibc, rpath }: ''
    rp=
    for d in $(echo "${rpath}" | tr ':' ' '); do [ -d "$d" ] && rp=''${rp:+$rp:}$d; done
    find $(alloutputs) -type f | while read -r f; do
      [ "$(head -c 4 "$f" | od -An -c | tr -d ' \n')" = '177ELF' ] || continue
      if patchelf --print-interpreter "$f" >/dev/null 2>&1; then
        patchelf ${target.patchelfFlags}--set-interpreter ${glibc}/lib/${target.ld} "$f"
      fi
      if [ -n "$(patchelf --print-needed "$f" 2>/dev/null)" ]; then
        patchelf ${target.patchelfFlags}--set-rpath "$rp" "$f"
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

  # mkDeb: one Nixpkgs-like package from one or more Debian packages, with the outputs of the
  # Nixpkgs attribute it stands for, in Nixpkgs' order (the first is what `nix-build -A` gives).
  # `split` moves the staged tree into the outputs (see `splitting`); what is left goes to
  # `main`. `libOutput` is the output whose lib/ goes first in the RUNPATH.
  mkDeb = { pname, debNames, outputs ? [ "out" ], main ? "out", libOutput ? main, deps ? [ ], withGlibc ? true, split ? "", postInstall ? "", name ? null }:
    let
      version = debVersion targetLock.packages.${builtins.head debNames}.version;
      rpathDeps = deps ++ (if withGlibc then [ glibc ] else [ ]);
    in
    run (if name == null then "${pname}-${version}" else name) { PATH = "${tools}/bin:${patchelf}/bin"; inherit outputs; } ''
      ${layout target}
      ${splitting}
      ${unpackDebs (map deb debNames)}
      relayout $TMPDIR/root $TMPDIR/stage
      ${split}
      rest ${main}
      for o in $outputs; do mkdir -p $(outdir $o); done
      ${postInstall}
      fixlinks
      ${provenance targetLock debNames}
      ${if withGlibc then patchElves { inherit glibc; rpath = builtins.concatStringsSep ":" ([ "\$${libOutput}/lib" ] ++ map (d: "${d}/lib") rpathDeps); } else ""}
    '' // { inherit pname version; meta.debian = map (n: { name = n; inherit (targetLock.packages.${n}) version sha256; }) debNames; };

  # `<output>/lib/libX.so -> <lib output>/lib/libX.so.N`: the development link Nixpkgs keeps in
  # `dev`, pointing at the library's own output (a reference between outputs).
  devLinks = libOut: ''
    for f in $(outdir ${libOut})/lib/*.so.*; do
      [ -e "$f" ] || continue
      b=$(basename "$f"); b=''${b%%.so.*}.so
      mkdir -p $dev/lib
      [ -e $dev/lib/$b ] || ln -s "$f" $dev/lib/$b
    done
  '';

  # Nixpkgs' glibc: out (libc, ld.so, gconv; lib64 -> lib) bin dev static getent. Debian's libc6
  # holds only what `out` has; the others stay thin.
  glibc = mkDeb { pname = "glibc"; debNames = [ "libc6" ]; withGlibc = false;
    outputs = [ "out" "bin" "dev" "static" "getent" ];
    split = "to getent bin/getent; to bin 'bin/*' 'sbin/*'";
    postInstall = ''
      ln -s lib $out/lib64
      ${devLinks "out"}
    ''; };

  # Nixpkgs' busybox: out only, bin/busybox with the applets as relative links where busybox
  # installs them (CONFIG_INSTALL_NO_USR): bin/<a> -> busybox, sbin/<a> -> ../bin/busybox. The
  # applet list comes from the host architecture's build of the same Debian package (same
  # version and config), so a cross build never runs a target binary.
  mkBusybox = { debName, pname ? "busybox", name ? null, withGlibc, applets ? null }: mkDeb {
    inherit pname name withGlibc;
    debNames = [ debName ];
    split = "rm -rf $stage/share";
    postInstall = ''
      dpkg-deb -x ${hostDeb debName} $TMPDIR/host
      ${if withGlibc
        then "${hostGlibc}/lib/${host.ld} --library-path ${hostGlibc}/lib $TMPDIR/host/bin/busybox --list-full"
        else "$TMPDIR/host/bin/busybox --list-full"} >$TMPDIR/applets${if applets == null then "" else "\n" + selectApplets applets}
      while read -r a; do
        a=''${a#usr/}
        case "$a" in
          bin/busybox) ;;
          bin/*) ln -sfn busybox "$out/$a" ;;
          sbin/*) mkdir -p $out/sbin; ln -sfn ../bin/busybox "$out/$a" ;;
          */*) echo "busybox applet in an unexpected place: $a"; exit 1 ;;
          *) ln -sfn bin/busybox "$out/$a" ;;
        esac
      done <$TMPDIR/applets
    '';
  };

  # The applet links an override asks for, from the binary's own list: every applet unless
  # `minimal`, then each `CONFIG_<APPLET> y|n` of `config` turns one on or off. An applet's
  # option is its name in capitals with `-` as `_` (run-parts: CONFIG_RUN_PARTS), as in
  # busybox's Kconfig; `[` and `[[` are CONFIG_TEST1 and CONFIG_TEST2, `sh` and `bash`
  # CONFIG_SH_IS_ASH and CONFIG_BASH_IS_ASH. An option that names no applet of this binary
  # fails the build with a line that says so.
  selectApplets = { minimal, config, label }: ''
    cat >$TMPDIR/config <<'EOC'
    ${config}
    EOC
    awk -v minimal=${if minimal then "1" else "0"} '
      function opt(a,  n) {
        n = a; sub(/.*\//, "", n)
        if (n == "[") return "CONFIG_TEST1"
        if (n == "[[") return "CONFIG_TEST2"
        if (n == "sh") return "CONFIG_SH_IS_ASH"
        if (n == "bash") return "CONFIG_BASH_IS_ASH"
        n = toupper(n); gsub(/-/, "_", n)
        return "CONFIG_" n
      }
      FNR == NR {
        line = $0
        if (match(line, /^# *CONFIG_[A-Za-z0-9_]+ is not set/)) { split(line, f, " "); want[f[2]] = "n"; next }
        sub(/#.*/, "", line); gsub(/=/, " ", line)
        if (split(line, f, " ") == 0) next
        if (f[2] != "y" && f[2] != "n") { print "error: bonsai: busybox.override: extraConfig = (" $0 "): ${label} is Debian'"'"'s prebuilt binary, so extraConfig turns its applets on or off (CONFIG_<APPLET> y or n) and nothing else" > "/dev/stderr"; bad = 1; next }
        want[f[1]] = f[2]; next
      }
      { o = opt($0); seen[o] = 1; if ((o in want) ? (want[o] == "y") : (minimal == 0 || $0 ~ /(^|\/)bin\/busybox$/)) print }
      END {
        for (o in want) if (!(o in seen)) { print "error: bonsai: busybox.override: extraConfig = (" o " " want[o] "): " o " names no applet of ${label}" > "/dev/stderr"; bad = 1 }
        exit bad
      }' $TMPDIR/config $TMPDIR/applets >$TMPDIR/applets.chosen
    mv $TMPDIR/applets.chosen $TMPDIR/applets
  '';

  # Nixpkgs' lib.makeOverridable: the result of `f args` with `.override`, which takes new
  # arguments (a set, or a function of the old ones) and calls `f` again; `lib.functionArgs`
  # reads `f`'s arguments through it.
  makeOverridable = f: args:
    let
      r = f args;
      override = {
        __functionArgs = builtins.functionArgs f;
        __functor = self: new: makeOverridable f (args // (if builtins.isFunction new then new args else new));
      };
    in r // { inherit override; };

  # Nixpkgs' busybox arguments, as far as a prebuilt binary can follow them: enableStatic picks
  # Debian's busybox-static; enableMinimal, enableAppletSymlinks and extraConfig choose which
  # applet links the package has (the binary keeps every applet's code: a busybox built from
  # source with that configuration is smaller still). useMusl cannot be followed: Debian builds
  # both against glibc.
  busyboxWith = { enableStatic ? false, enableMinimal ? false, enableAppletSymlinks ? true, useMusl ? false, extraConfig ? "" }:
    let
      debName = if enableStatic then "busybox-static" else "busybox";
      linksChanged = enableMinimal || extraConfig != "";
      suffix = if !enableAppletSymlinks then "-nolinks" else if linksChanged then "-applets" else "";
      v = debVersion targetLock.packages.${debName}.version;
    in
    if useMusl then throw "bonsai: busybox.override: useMusl = true: the offline set's busybox is Debian's, built against glibc (static with enableStatic = true)"
    else if !enableAppletSymlinks then (mkBusybox { inherit debName; withGlibc = !enableStatic; name = "${debName}${suffix}-${v}"; applets = { minimal = true; config = ""; label = "${debName} ${v}"; }; })
    else mkBusybox ({ inherit debName; withGlibc = !enableStatic; }
      // (if enableStatic || linksChanged then { name = "${debName}${suffix}-${v}"; } else { })
      // (if linksChanged then { applets = { minimal = enableMinimal; config = extraConfig; label = "${debName} ${v}"; }; } else { }));
  busybox = makeOverridable busyboxWith { };
  # `pkgsStatic.busybox`: static, no glibc in the closure (Debian's busybox-static).
  busyboxStatic = makeOverridable busyboxWith { enableStatic = true; };

  # skaware packages, with Nixpkgs' outputs (pkgs/development/skaware-packages).
  skalibs = mkDeb { pname = "skalibs"; debNames = [ "libskarnet2.13" ];
    outputs = [ "lib" "dev" "doc" "out" ]; libOutput = "lib";
    split = "to lib 'lib/*'; to doc 'share/doc'";
    postInstall = devLinks "lib"; };
  execline = mkDeb { pname = "execline"; debNames = [ "execline" "libexecline2.9" ]; deps = [ skalibs ];
    outputs = [ "bin" "man" "lib" "dev" "doc" "out" ]; libOutput = "lib";
    split = ''
      rm -f $stage/bin/execlineb
      mkdir -p $stage/bin; mv $stage/lib/execline/bin/* $stage/bin/; rm -rf $stage/lib/execline
      to lib 'lib/*'; to man 'share/man'; to doc 'share/doc'; to bin 'bin'
    '';
    postInstall = ''
      ${devLinks "lib"}
      # Nixpkgs wraps execlineb so that it finds its siblings (wrapProgram --prefix PATH).
      mv $bin/bin/execlineb $bin/bin/.execlineb-wrapped
      printf '#!%s\nPATH=%s/bin''${PATH:+:$PATH}\nexport PATH\nexec %s/bin/.execlineb-wrapped "$@"\n' \
        ${runtimeShell} $bin $bin >$bin/bin/execlineb
      chmod 555 $bin/bin/execlineb
    ''; };
  s6 = mkDeb { pname = "s6"; debNames = [ "s6" "libs6-2.11" ]; deps = [ execline.lib skalibs ];
    outputs = [ "out" "man" "dev" "doc" ];
    split = "mkdir -p $stage/libexec; mv $stage/lib/s6/* $stage/libexec/; rmdir $stage/lib/s6; to man 'share/man'; to doc 'share/doc'";
    postInstall = devLinks "out"; };
  # Nixpkgs' runit: every program in out/bin (runit-init included), man pages in `man`.
  runit = mkDeb { pname = "runit"; debNames = [ "runit" ];
    outputs = [ "out" "man" ];
    split = ''
      mkdir -p $stage/bin
      mv $stage/sbin/runit $stage/sbin/runsvchdir $stage/sbin/utmpset $stage/lib/runit/runit-init $stage/bin/
      # Debian's own scripts and configuration, which Nixpkgs' runit does not have
      rm -rf $stage/etc $stage/sbin $stage/lib $stage/bin/cpsv $stage/share/bash-completion $stage/share/doc-base
      to man 'share/man'
    ''; };
  zlib = mkDeb { pname = "zlib"; debNames = [ "zlib1g" ]; outputs = [ "out" "dev" "static" ]; postInstall = devLinks "out"; };
  libxcrypt = mkDeb { pname = "libxcrypt"; debNames = [ "libcrypt1" ]; outputs = [ "out" "man" ]; split = "to man 'share/man'"; };
  libtommath = mkDeb { pname = "libtommath"; debNames = [ "libtommath1" ]; };
  # Firmware as Nixpkgs ships it: files under out/lib/firmware (here cfg80211's regulatory
  # database and its signature, which the kernel loads with request_firmware). Debian ships two
  # copies for update-alternatives; Nixpkgs has upstream's as regulatory.db{,.p7s}.
  wireless-regdb = mkDeb { pname = "wireless-regdb"; debNames = [ "wireless-regdb" ]; withGlibc = false;
    postInstall = ''
      cd $out/lib/firmware
      mv regulatory.db-upstream regulatory.db
      mv regulatory.db.p7s-upstream regulatory.db.p7s
      rm regulatory.db-debian regulatory.db.p7s-debian
      cd - >/dev/null
    ''; };
  gmp = mkDeb { pname = "gmp"; debNames = [ "libgmp10" ]; };
  libtomcrypt = mkDeb { pname = "libtomcrypt"; debNames = [ "libtomcrypt1" ]; deps = [ libtommath gmp ]; };
  # Nixpkgs' dropbear: the client tools in out/bin, the server in out/sbin.
  # Its libraries are arguments, as in Nixpkgs (`dropbear.override { zlib = ...; }`), so an
  # override can give it another build of one; Debian's binary needs each of them.
  dropbear = makeOverridable ({ zlib, libxcrypt, libtomcrypt, libtommath, gmp }@args:
    let notPackages = builtins.filter (n: !(builtins.isAttrs args.${n} && args.${n} ? outPath)) (builtins.attrNames args);
        bad = builtins.head notPackages;
    in if notPackages != [ ] then throw "bonsai: dropbear.override: ${bad} = ${builtins.toJSON args.${bad}}: the offline set's dropbear is Debian's prebuilt dropbear-bin, which links against ${bad}; give it another ${bad} package (from an overlay), or build dropbear from source to leave it out"
    else mkDeb { pname = "dropbear"; debNames = [ "dropbear-bin" ]; deps = [ zlib libxcrypt libtomcrypt libtommath gmp ]; })
    { inherit zlib libxcrypt libtomcrypt libtommath gmp; };

  # The shell of generated scripts (Nixpkgs' runtimeShell is bash; here the target's busybox).
  runtimeShell = "${busybox}/bin/sh";

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
        ${make} INSTALL_MOD_PATH=$modules INSTALL_MOD_STRIP=1 DEPMOD=depmod modules_install
        test -s $modules/lib/modules/${modDir}/modules.dep || { echo "depmod wrote no modules.dep" >&2; exit 1; }
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

  # ---- A team's own packages: the part of Nixpkgs' stdenv and callPackage a small package needs.

  # stdenv.cc: `cc`, `gcc`, `c++`, `g++` (and the same with the target prefix) compile for the
  # board with the host's toolchain (cross for another architecture) and link against the set's
  # glibc: the interpreter and RUNPATH are set at link time (the compiler's own C library only
  # serves the link), so no patching is needed. NIX_CFLAGS_COMPILE and NIX_CFLAGS_LINK (set by
  # mkDerivation from buildInputs) are added, as Nixpkgs' cc-wrapper does. The build folder is
  # written as /build in debug info and __FILE__ (-ffile-prefix-map), so a build in Nix's
  # sandbox (a remote builder's) and one without it give the same bytes.
  ccWrapper = run "bonsai-cc-wrapper" { inherit toolchainId; } ''
    mkdir -p $out/bin
    for t in cc:gcc gcc:gcc c++:g++ g++:g++; do
      name=''${t%%:*}
      # the host's compiler by its full path: the wrapper's own name comes first on PATH
      # C++ is optional (a host may have only the C cross compiler); C is not.
      real=$(PATH=${hostTools} command -v ${crossPrefix}''${t#*:}) || {
        case $name in c++|g++) echo "no ${crossPrefix}''${t#*:} in ${hostTools}: $name is left out"; continue ;; esac
        echo "no ${crossPrefix}''${t#*:} in ${hostTools}"; exit 1; }
      cat >$out/bin/$name <<EOS
    #!${hostShell}
    exec $real "\$@" -ffile-prefix-map=\''${NIX_BUILD_TOP:-/build}=/build \$NIX_CFLAGS_COMPILE \$NIX_CFLAGS_LINK -Wl,--dynamic-linker=${glibc}/lib/${target.ld} -Wl,-rpath,${glibc}/lib
    EOS
      chmod 555 $out/bin/$name
      ${if crossPrefix == "" then "" else "ln -s $name $out/bin/${crossPrefix}$name"}
    done
  '' // { targetPrefix = crossPrefix; isGNU = true; libc = glibc; };

  # autoPatchelfHook, minimal: in nativeBuildInputs, it gives every dynamically linked ELF file
  # of the outputs the store glibc's interpreter and a RUNPATH of the output's lib/, the
  # buildInputs' lib/ and glibc, and fails naming a library none of them has. For prebuilt
  # binaries: the one place where patching is right.
  autoPatchelfHook = run "auto-patchelf-hook" { } ''
    mkdir -p $out/bin
    cat >$out/bin/auto-patchelf <<'EOS'
    #!${sh}
    # auto-patchelf <rpath> <dir>...
    set -e
    rpath=$1; shift
    find "$@" -type f | while read -r f; do
      [ "$(head -c 4 "$f" | od -An -c | tr -d ' \n')" = '177ELF' ] || continue
      ${patchelf}/bin/patchelf --print-interpreter "$f" >/dev/null 2>&1 || continue
      ${patchelf}/bin/patchelf ${target.patchelfFlags}--set-interpreter ${glibc}/lib/${target.ld} "$f"
      for n in $(${patchelf}/bin/patchelf --print-needed "$f"); do
        found=
        for d in $(echo "$rpath" | tr ':' ' '); do [ -e "$d/$n" ] && found=1; done
        if [ -z "$found" ]; then echo "auto-patchelf: $f needs $n, which is in none of $rpath (add the package that has it to buildInputs)" >&2; exit 1; fi
      done
      ${patchelf}/bin/patchelf ${target.patchelfFlags}--set-rpath "$rpath" "$f"
      echo "auto-patchelf: $f"
    done
    EOS
    chmod 555 $out/bin/auto-patchelf
  '' // { bonsaiHook = "auto-patchelf"; };

  # stdenv.mkDerivation for small packages: pname, version (or name), src (a file, copied in,
  # or a folder, copied in and entered), configurePhase, buildPhase, installPhase with their
  # pre/post hooks, nativeBuildInputs (their bin/ on PATH; autoPatchelfHook runs after the
  # install), buildInputs (include/ and lib/ to the compiler, lib/ into the RUNPATH), outputs,
  # passthru and meta. Other attributes become environment variables, as in Nixpkgs. Nothing is
  # stripped (bonsai strips in the image; `dontStrip` is accepted). The builder is the host's
  # shell with the host's tools, like the kernel's.
  mkDerivation = args@{ pname ? null, version ? null, name ? null, src ? null
    , nativeBuildInputs ? [ ], buildInputs ? [ ], outputs ? [ "out" ]
    , passthru ? { }, meta ? { }, ... }:
    let
      fullName = if name != null then name
        else if pname != null && version != null then "${pname}-${version}"
        else throw "bonsai offline stdenv.mkDerivation: give pname and version (or name)";
      hooks = builtins.filter (d: (d.bonsaiHook or null) == "auto-patchelf") nativeBuildInputs;
      libDirs = builtins.concatStringsSep ":" ([ "$out/lib" ] ++ map (d: "${d}/lib") buildInputs ++ [ "${glibc}/lib" ]);
      env = builtins.removeAttrs args [ "pname" "version" "name" "nativeBuildInputs" "buildInputs" "outputs" "passthru" "meta" ];
      drv = runHost fullName (env // {
        inherit outputs;
        PATH = builtins.concatStringsSep ":" (map (d: "${d}/bin") ([ ccWrapper ] ++ nativeBuildInputs) ++ [ hostTools "${tools}/bin" ]);
        NIX_CFLAGS_COMPILE = builtins.concatStringsSep " " (map (d: "-I${d.dev or d}/include") buildInputs);
        NIX_CFLAGS_LINK = builtins.concatStringsSep " " (map (d: "-L${d}/lib -Wl,-rpath,${d}/lib") buildInputs);
        src = if src == null then "" else src;
      }) ''
        export HOME=$TMPDIR/home
        mkdir -p $TMPDIR/build
        cd $TMPDIR/build
        runPhase() { eval "ph=\''${$1:-}"; [ -z "$ph" ] || eval "$ph"; }
        if [ -n "$unpackPhase" ]; then eval "$unpackPhase"
        elif [ -n "$src" ] && [ -z "$dontUnpack" ]; then
          if [ -d "$src" ]; then
            cp -R "$src" source; chmod -R u+w source; cd source
          else
            cp "$src" "$(basename "$src" | cut -c34-)"
          fi
        fi
        for p in preConfigure configurePhase postConfigure preBuild buildPhase postBuild preInstall installPhase postInstall; do
          runPhase $p
        done
        for o in $outputs; do eval "[ -e \"\''$$o\" ]" || { echo "bonsai offline stdenv: ${fullName}: the install did not create output $o"; exit 1; }; done
        ${if hooks == [ ] then "" else ''auto-patchelf "${libDirs}" $(for o in $outputs; do eval echo "\''$$o"; done)''}
      '';
    in
    drv // { inherit passthru meta; } // passthru
    // (if pname != null then { inherit pname; } else { })
    // (if version != null then { inherit version; } else { });

  stdenv = {
    inherit mkDerivation;
    cc = ccWrapper;
    shell = hostShell;
    isLinux = true;
    hostPlatform = { inherit system; isLinux = true; isAarch64 = system == "aarch64-linux"; isx86_64 = system == "x86_64-linux"; };
    buildPlatform = { system = hostSystem; isLinux = true; };
    targetPlatform = stdenv.hostPlatform;
  };

  # Nixpkgs' callPackage: a function (or a file holding one) gets the set's attributes its
  # arguments name, plus the overrides; `newScope extra` looks in `extra` first.
  callPackageWith = set: fn: overrides:
    let f = if builtins.isFunction fn then fn else import fn;
    in f (builtins.intersectAttrs (builtins.functionArgs f) set // overrides);

  base = {
    inherit glibc busybox skalibs execline s6 runit zlib libxcrypt libtommath libtomcrypt gmp dropbear wireless-regdb linux linuxManualConfig;
    inherit stdenv patchelf autoPatchelfHook runtimeShell;
    pkgsStatic = { busybox = busyboxStatic; };
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
  };

  # Overlays as Nixpkgs applies them: each is `final: prev: { ... }`, `prev` is the set before
  # it and `final` the set after all of them. Unlike Nixpkgs, the set's own packages are plain
  # bindings: an overlay that replaces zlib changes `final.zlib`, not the zlib dropbear links.
  extended = builtins.foldl' (prev: o: prev // (if builtins.isFunction o then o else import o) final prev) base overlays;
  final = extended // {
    callPackage = callPackageWith final;
    newScope = extra: callPackageWith (final // extra);
  };
in
final
