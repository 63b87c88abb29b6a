# olddefconfig, as far as the fixture needs it: the last assignment of an option wins, and an
# option whose Kconfig dependency cannot be met (see ../Kconfig) is turned off.
BEGIN { unmet["CONFIG_FIXTURE_UNSUPPORTED"] = 1 }
{
	if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) key = substr($0, 1, RLENGTH - 1)
	else if (match($0, /^# CONFIG_[A-Za-z0-9_]+ is not set/)) key = $2
	else next
	if (!(key in value)) order[n++] = key
	value[key] = $0
}
END {
	for (i = 0; i < n; i++) {
		k = order[i]
		if (k in unmet) print "# " k " is not set"
		else print value[k]
	}
}
