# The fixture's generic builder (run by /bin/sh): Nixpkgs' phases in Nixpkgs' order, each one
# replaced by an attribute of its name, skipped with dontUnpack/dontConfigure/..., with
# pre/post hooks, or the whole list replaced by `phases`.
set -e
export PATH="$fixturePath"
export NIX_BUILD_CORES="${NIX_BUILD_CORES:-1}"
export HOME=/homeless-shelter
cd "${TMPDIR:-$NIX_BUILD_TOP}"

defaultUnpackPhase() {
	if [ -z "$src" ]; then
		echo "variable \$src or \$srcs should point to the source"
		exit 1
	fi
	if [ -d "$src" ]; then
		cp -r "$src" source
		chmod -R u+w source
		cd source
		return
	fi
	case "$src" in
	*.tar | *.tar.* | *.tgz)
		mkdir unpack
		tar -xf "$src" -C unpack
		cd "unpack/$(ls unpack | head -n 1)"
		;;
	*)
		echo "do not know how to unpack source archive $src"
		exit 1
		;;
	esac
}
defaultPatchPhase() {
	for p in $patches; do patch -p1 <"$p"; done
}
defaultConfigurePhase() {
	if [ -x ./configure ]; then ./configure --prefix="$out" $configureFlags; fi
}
defaultBuildPhase() {
	if [ -f Makefile ] || [ -f makefile ]; then
		make -j"$NIX_BUILD_CORES" $makeFlags $buildFlags
	else
		echo "no Makefile or custom buildPhase, doing nothing"
	fi
}
defaultCheckPhase() {
	if [ -f Makefile ]; then make check $makeFlags; fi
}
defaultInstallPhase() {
	if [ -f Makefile ] || [ -f makefile ]; then
		make install $makeFlags $installFlags
	else
		echo "no Makefile or custom installPhase, doing nothing"
	fi
}
defaultFixupPhase() {
	:
}

runPhase() {
	case "$1" in
	unpackPhase) skip=$dontUnpack hook=Unpack ;;
	patchPhase) skip=$dontPatch hook=Patch ;;
	configurePhase) skip=$dontConfigure hook=Configure ;;
	buildPhase) skip=$dontBuild hook=Build ;;
	checkPhase) if [ -n "$doCheck" ]; then skip=; else skip=1; fi; hook=Check ;;
	installPhase) skip=$dontInstall hook=Install ;;
	fixupPhase) skip=$dontFixup hook=Fixup ;;
	*) skip= hook= ;;
	esac
	[ -z "$skip" ] || return 0
	echo "running $1"
	[ -z "$hook" ] || eval "eval \"\${pre$hook:-}\""
	eval "body=\${$1:-}"
	if [ -n "$body" ]; then
		eval "$body"
	elif command -v "default$(echo "$1" | cut -c1 | tr a-z A-Z)$(echo "$1" | cut -c2-)" >/dev/null; then
		"default$(echo "$1" | cut -c1 | tr a-z A-Z)$(echo "$1" | cut -c2-)"
	else
		echo "phase $1 is not defined"
		exit 1
	fi
	[ -z "$hook" ] || eval "eval \"\${post$hook:-}\""
}

for phase in ${phases:-unpackPhase patchPhase configurePhase buildPhase checkPhase installPhase fixupPhase}; do
	runPhase "$phase"
done
