//! Deliberate faults in a backend's rendered files, for the negative tests of the conformance
//! judge only: each one breaks a behaviour the suite claims to check, so a judge that passes a
//! faulty backend is caught. Applied after rendering, as edits of the generated text, so the
//! renderer itself stays as it is; `every_fault_changes_what_it_breaks` fails when a fault no
//! longer finds the text it edits. Never set by a normal build (`BONSAI_TEST_BROKEN` in xtask).

use crate::tree::{Node, NodeKind, Source};

/// One deliberate fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The restart delay never doubles.
    FixedDelay,
    /// The delay never returns to its initial value after 10 s up (shell backends).
    NoReset,
    /// `restart = "never"` and `"on-failure"` restart like `"always"`.
    IgnoreNever,
    /// The environment is not cleared (shell backends).
    NoEnvClear,
    /// Every service is stopped with TERM, whatever its stop signal.
    TermOnly,
    /// A service gets TERM and then its stop signal (runit's control/d, which runs after
    /// runsv's TERM; `kill -TERM` before the signal under busybox init).
    TermThenSignal,
    /// No KILL after the stop timeout.
    NoKill,
    /// `/tmp` is not mounted.
    NoTmp,
    /// Oneshots run in reverse order.
    Unordered,
    /// s6's `/init` runs `s6-svscan` as its child instead of exec'ing it: PID 1 stays the shell.
    NoExecInit,
    /// A release whose `/init` exits at once, so the kernel panics (any backend): for the A/B
    /// test's bad release.
    InitExits,
    /// A release whose health check fails (an extra check that always fails).
    HealthFails,
    /// A release that hangs after its services are up, before its health step finishes.
    Hang,
    /// The health step says it blessed a trial but leaves the entry as it is.
    NoBless,
    /// `[[setup.mounts]]` are not unmounted at shutdown (the devices suite's clean-filesystem
    /// row must fail).
    NoUnmount,
    /// The modules step loads no module for the devices present at boot, nor does the device
    /// handler by modalias (the devices suite's module rows must fail).
    NoColdplug,
    /// The device handler applies no `[[device-rules]]` (the devices suite's coldplug and
    /// hotplug rows must fail).
    NoDeviceRules,
}

pub const FAULTS: &[(&str, Fault)] = &[
    ("fixed-delay", Fault::FixedDelay),
    ("no-reset", Fault::NoReset),
    ("ignore-never", Fault::IgnoreNever),
    ("no-env-clear", Fault::NoEnvClear),
    ("term-only", Fault::TermOnly),
    ("term-then-signal", Fault::TermThenSignal),
    ("no-kill", Fault::NoKill),
    ("no-tmp", Fault::NoTmp),
    ("unordered", Fault::Unordered),
    ("no-exec-init", Fault::NoExecInit),
    ("init-exits", Fault::InitExits),
    ("health-fails", Fault::HealthFails),
    ("hang", Fault::Hang),
    ("no-bless", Fault::NoBless),
    ("no-unmount", Fault::NoUnmount),
    ("no-coldplug", Fault::NoColdplug),
    ("no-device-rules", Fault::NoDeviceRules),
];

/// The faults of the A/B test's releases (and of its own negative test): `all` leaves them out,
/// since they break whole releases rather than one behaviour the conformance suite checks. It
/// leaves out the devices suite's faults too: they break rows of another profile.
const RELEASE_FAULTS: &[Fault] = &[
    Fault::InitExits,
    Fault::HealthFails,
    Fault::Hang,
    Fault::NoBless,
    Fault::NoUnmount,
    Fault::NoColdplug,
    Fault::NoDeviceRules,
];

/// Parses a comma-separated list (`all` for every fault).
pub fn parse(list: &str) -> Result<Vec<Fault>, String> {
    let mut out = Vec::new();
    for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if w == "all" {
            out.extend(
                FAULTS
                    .iter()
                    .map(|(_, f)| *f)
                    .filter(|f| !RELEASE_FAULTS.contains(f)),
            );
            continue;
        }
        match FAULTS.iter().find(|(n, _)| *n == w) {
            Some((_, f)) => out.push(*f),
            None => {
                let names: Vec<&str> = FAULTS.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown fault '{w}' (one of: all, {})",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

/// Applies `faults` to rendered files (path relative to the image root, node).
pub fn apply(files: &mut Vec<(String, Node)>, faults: &[Fault]) {
    if faults.is_empty() {
        return;
    }
    if faults.contains(&Fault::InitExits) {
        files.retain(|(p, _)| p != "init");
        files.push((
            "init".into(),
            Node::file(
                Source::Bytes(
                    b"#!/bin/sh\necho 'bonsai: fault init-exits: this /init exits at once'\nexit 1\n"
                        .to_vec(),
                ),
                0o755,
            ),
        ));
    }
    if faults.contains(&Fault::TermOnly) {
        files.retain(|(p, _)| !(p.starts_with("etc/service/") && p.contains("/control/")));
    }
    if faults.contains(&Fault::TermThenSignal) {
        for (p, _) in files.iter_mut() {
            if p.starts_with("etc/service/") && p.ends_with("/control/t") {
                p.replace_range(p.len() - 1.., "d");
            }
        }
    }
    for (path, node) in files.iter_mut() {
        let NodeKind::File {
            source: Source::Bytes(bytes),
        } = &mut node.kind
        else {
            continue;
        };
        let Ok(text) = std::str::from_utf8(bytes) else {
            continue;
        };
        let mut t = text.to_string();
        for f in faults {
            t = edit(path, &t, *f);
        }
        *bytes = t.into_bytes();
    }
}

fn drop_lines(t: &str, pred: impl Fn(&str) -> bool) -> String {
    t.lines()
        .filter(|l| !pred(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn edit_json(t: &str, f: impl Fn(&mut serde_json::Value)) -> String {
    match serde_json::from_str::<serde_json::Value>(t) {
        Ok(mut v) => {
            f(&mut v);
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        Err(_) => t.to_string(),
    }
}

fn services(v: &mut serde_json::Value) -> impl Iterator<Item = &mut serde_json::Value> {
    v["services"].as_array_mut().into_iter().flatten()
}

fn edit(path: &str, t: &str, fault: Fault) -> String {
    let finish = path.starts_with("etc/bonsai/svc/") && path.ends_with("/finish");
    let json = path == "etc/bonsai/init.json";
    match fault {
        Fault::FixedDelay if finish => t.replace("next=$((delay * 2))", "next=$delay"),
        Fault::FixedDelay if json => edit_json(t, |v| {
            for s in services(v) {
                s["backoff_max_ms"] = s["backoff_initial_ms"].clone();
            }
        }),
        Fault::NoReset if finish => {
            drop_lines(t, |l| l.starts_with("[ $((now - started)) -ge 10 ]"))
        }
        Fault::IgnoreNever if finish => drop_lines(t, |l| {
            l.contains(": >/run/bonsai/down/") && l.trim_end().ends_with("exit 0")
                || l.starts_with("if [ \"$code\" = 0 ]; then")
        }),
        Fault::IgnoreNever if json => edit_json(t, |v| {
            for s in services(v) {
                s["restart"] = "always".into();
            }
        }),
        Fault::NoEnvClear if path.ends_with("/exec") => {
            t.replace("exec env -i PATH=/bin", "exec env PATH=/bin")
        }
        Fault::TermOnly if path == "etc/bonsai/shutdown" => {
            let mut t = t.to_string();
            for sig in ["HUP", "INT", "QUIT", "USR1", "USR2"] {
                t = t.replace(&format!("kill -{sig} \"$p\""), "kill -TERM \"$p\"");
            }
            t
        }
        Fault::TermOnly if path.ends_with("/down-signal") => "SIGTERM\n".into(),
        Fault::TermOnly if json => edit_json(t, |v| {
            for s in services(v) {
                s["stop_signal"] = 15.into();
            }
        }),
        Fault::TermThenSignal if path == "etc/bonsai/shutdown" => {
            let mut t = t.to_string();
            for sig in ["HUP", "INT", "QUIT", "USR1", "USR2"] {
                t = t.replace(
                    &format!("kill -{sig} \"$p\""),
                    &format!("kill -TERM \"$p\"; kill -{sig} \"$p\""),
                );
            }
            t
        }
        Fault::NoKill if path == "etc/bonsai/shutdown" => {
            let mut out = String::new();
            for l in t.lines() {
                let l = match (l.find(" || sv kill "), l.find(" || s6-svc -k ")) {
                    (Some(i), _) | (None, Some(i)) => &l[..i],
                    _ => l,
                };
                out.push_str(&l.replace("; kill -KILL \"$p\" 2>/dev/null", ""));
                out.push('\n');
            }
            out
        }
        // bonsai-init stops services itself: it never KILLs one that outlives a stop timeout
        // of an hour.
        Fault::NoKill if json => edit_json(t, |v| {
            for s in services(v) {
                s["stop_timeout_ms"] = 3_600_000.into();
            }
        }),
        Fault::NoUnmount if path == "etc/bonsai/shutdown" => {
            drop_lines(t, |l| l == "/etc/bonsai/unmounts")
        }
        Fault::NoUnmount if json => edit_json(t, |v| {
            v["unmount"] = serde_json::json!([]);
        }),
        Fault::NoColdplug if path == "etc/bonsai/modules" => {
            t.replace("modprobe -q \"$a\"", "false")
        }
        Fault::NoColdplug if path == "etc/mdev.conf" => drop_lines(t, |l| l.starts_with("-$MODALIAS=")),
        Fault::NoColdplug if path == "etc/bonsai/devices.json" => edit_json(t, |v| {
            v["modprobe"] = false.into();
        }),
        Fault::NoDeviceRules if path == "etc/mdev.conf" => {
            drop_lines(t, |l| l.contains("/etc/bonsai/devrule "))
        }
        Fault::NoDeviceRules if path == "etc/bonsai/devices.json" => edit_json(t, |v| {
            v["rules"] = serde_json::json!([]);
        }),
        Fault::NoTmp if path == "etc/bonsai/setup" => drop_lines(t, |l| {
            l.contains(" /tmp && mount ") || l.ends_with(" tmpfs /tmp")
        }),
        Fault::NoTmp if json => edit_json(t, |v| {
            if let Some(m) = v["mounts"].as_array_mut() {
                m.retain(|m| m["target"] != "/tmp");
            }
        }),
        Fault::Unordered if path == "etc/bonsai/oneshots" => {
            let (head, runs): (Vec<&str>, Vec<&str>) = t
                .lines()
                .partition(|l| !l.starts_with("if /etc/bonsai/svc/"));
            let mut out: String = head.iter().map(|l| format!("{l}\n")).collect();
            for l in runs.iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Fault::Unordered if json => edit_json(t, |v| {
            if let Some(list) = v["services"].as_array_mut() {
                list.reverse();
                for s in list.iter_mut() {
                    s["after"] = serde_json::json!([]);
                }
            }
        }),
        Fault::NoExecInit if path == "init" => t.replace("exec s6-svscan ", "s6-svscan "),
        Fault::HealthFails if path == "etc/bonsai/health" => t.replace(
            "# the verdict\n",
            "health fault 1000 /bin/sh -c 'echo fault health-fails: this check always fails; exit 1' || failed=\"$failed fault\"\n# the verdict\n",
        ),
        Fault::NoBless if path == "etc/bonsai/health" => t.replace(
            "\t\tif bless; then",
            "\t\tif true; then",
        ),
        Fault::Hang if path == "etc/bonsai/health" => t.replace(
            "# health checks: ",
            "echo 'bonsai: fault hang: this release hangs before its health checks' >/dev/console\nsleep 2147483647\n# health checks: ",
        ),
        _ => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{render, Backend, InitInputs};
    use crate::system::{validate, ServiceSpec, SystemSpec};
    use crate::tree::Tree;

    fn system() -> crate::system::System {
        let mut spec = SystemSpec::default();
        let svc = |t: &str| -> ServiceSpec { serde_json::from_str(t).unwrap() };
        spec.services.insert(
            "a".into(),
            svc(r#"{"command": ["/bin/sleep", "1"], "stop-signal": "HUP", "restart": "never"}"#),
        );
        spec.services.insert(
            "b".into(),
            svc(r#"{"command": ["/bin/true"], "restart": "on-failure"}"#),
        );
        spec.services.insert(
            "o1".into(),
            svc(r#"{"command": ["/bin/true"], "kind": "oneshot"}"#),
        );
        spec.services.insert(
            "o2".into(),
            svc(r#"{"command": ["/bin/true"], "kind": "oneshot", "after": ["o1"]}"#),
        );
        spec.kernel.modules.push("virtio_balloon".into());
        spec.device_rules.push(crate::devices::DeviceRuleSpec {
            kernel: Some("vd*".into()),
            mode: Some("0660".into()),
            ..Default::default()
        });
        spec.setup.mounts.push(
            serde_json::from_str(r#"{"device": "/dev/vda", "where": "/data", "type": "vfat"}"#)
                .unwrap(),
        );
        validate(&spec, "h", &|_| true).unwrap()
    }

    fn files(b: Backend, faults: &[Fault]) -> Vec<(String, String)> {
        let mut t = Tree::new();
        let inputs = InitInputs {
            backend: b,
            busybox: "/nix/store/b-busybox".into(),
            runit: Some("/nix/store/r-runit".into()),
            s6: Some("/nix/store/s-s6".into()),
            bonsai_init: Some("/dev/null".into()),
            faults: faults.to_vec(),
        };
        render(&mut t, &system(), &inputs).unwrap();
        t.iter()
            .filter_map(|(p, n)| match &n.kind {
                NodeKind::File {
                    source: Source::Bytes(b),
                } => Some((
                    p.as_str().to_string(),
                    String::from_utf8_lossy(b).into_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Each fault changes the rendered files of every backend it applies to: a fault that no
    /// longer finds the text it edits would let the broken variant pass for a working one.
    #[test]
    fn every_fault_changes_what_it_breaks() {
        for (name, f) in FAULTS {
            let backends: &[Backend] = match f {
                // bonsai-init resets and clears the environment natively.
                Fault::NoReset | Fault::NoEnvClear => {
                    &[Backend::Busybox, Backend::Runit, Backend::S6]
                }
                // The other backends' /init is a link to the init program itself.
                Fault::NoExecInit => &[Backend::S6],
                // s6's down-signal and bonsai-init's stop_signal name one signal.
                Fault::TermThenSignal => &[Backend::Busybox, Backend::Runit],
                _ => &[
                    Backend::Busybox,
                    Backend::Runit,
                    Backend::S6,
                    Backend::BonsaiInit,
                ],
            };
            for b in backends {
                assert_ne!(
                    files(*b, &[]),
                    files(*b, &[*f]),
                    "{name} changes nothing under {b:?}"
                );
            }
        }
        assert!(parse("fixed-delay, no-kill").unwrap().len() == 2);
        assert!(parse("sideways")
            .unwrap_err()
            .contains("unknown fault 'sideways'"));
        assert_eq!(parse("").unwrap(), vec![]);
    }
}
