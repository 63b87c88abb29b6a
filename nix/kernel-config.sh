# Merge config fragments onto a base config and record, per option a fragment sets, whether it
# survived `make olddefconfig`. Run by nix/kernel.nix; the caller (bonsai) judges the report.
# Environment: src (kernel tarball), base (tinyconfig|defconfig|allnoconfig), fragments (space
# separated paths, in order), kernelArch, crossPrefix, out.
set -eu
mkdir -p "$TMPDIR/src"
cd "$TMPDIR/src"
tar -xf "$src" --strip-components=1
make ARCH="$kernelArch" CROSS_COMPILE="$crossPrefix" "$base" >/dev/null
for f in $fragments; do
	cat "$f" >>.config
done
make ARCH="$kernelArch" CROSS_COMPILE="$crossPrefix" olddefconfig >/dev/null
mkdir -p "$out"
: >"$out/report"
# Fragments are named by position (1, 2, ...): their store names carry no file name.
i=0
for f in $fragments; do
	i=$((i + 1))
	name=$i
	grep -E '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set)' "$f" | while IFS= read -r line; do
		case "$line" in
		"# "*) opt=${line#\# }; opt=${opt%% *}; want=n ;;
		*) opt=${line%%=*}; want=${line#*=} ;;
		esac
		got=$(grep -E "^$opt=" .config | tail -n 1 | cut -d= -f2- || true)
		[ -n "$got" ] || got=n
		status=ok
		why=
		if [ "$got" != "$want" ]; then
			status=dropped
			# What Kconfig says the option needs (its "depends on" lines), as the reason.
			sym=${opt#CONFIG_}
			why=$(find . -name 'Kconfig*' -exec grep -A30 -h "^[[:space:]]*\(menu\)\?config $sym\$" {} + 2>/dev/null |
				sed -n '2,$p' | sed '/^[[:space:]]*\(menu\)\?config /,$d' | grep -E '^[[:space:]]*depends on' |
				sed 's/^[[:space:]]*//' | tr '\n' ';' | sed 's/;$//')
		fi
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$opt" "$want" "$got" "$name" "$status" "$why" >>"$out/report"
	done
done
cp .config "$out/config"
