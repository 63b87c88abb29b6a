//! The devices suite end to end: `cargo xtask conformance --profile devices` on qemu-x86_64 and
//! qemu-aarch64 with every init backend (DHCP address, route and resolv.conf as text, a NIC with
//! no server, a data partition made on the first boot and read back on the second, judged on
//! the host from the guest's output and from the disk's own bytes after poweroff, a driver built
//! as a module that loads for its device at boot), broken variants that do not unmount or load
//! no module at coldplug, and the kernel-config report's modules.
//! Needs Nix and QEMU (`cargo xtask test` installs them); fails, never skips, without them.

use std::sync::Mutex;

mod common;
use common::{assert_every_row_passes, matrix_rows, ok, require, xtask};

/// The boards' output folders are shared by the tests, and the machine has 2 cores.
static LOCK: Mutex<()> = Mutex::new(());

const INITS: [&str; 4] = ["busybox", "runit", "s6", "bonsai-init"];

/// A row's name as the matrix shows it: at most 59 characters before an ellipsis.
fn shown(name: &str) -> &str {
    &name[..name.len().min(59)]
}

fn devices_pass_on(board: &str) {
    let stdout = ok(&["conformance", "--board", board, "--profile", "devices"]);
    let header = stdout
        .lines()
        .find(|l| l.starts_with("check "))
        .expect("matrix header");
    for init in INITS {
        assert!(header.contains(init), "{header}");
    }
    let rows = matrix_rows(&stdout);
    for want in [
        "dhcp: eth0 has the lease's address",
        "dhcp: the default route is the lease's router",
        "dhcp: resolv.conf names the lease's DNS server",
        "dhcp: no lease leaves eth1 without an address",
        "mount: the data partition is mounted read-write",
        "mount: this boot reads what the last one wrote",
        "mount: the filesystem is clean after poweroff",
        "mount: make-fs gave the filesystem its label",
        "module: only named modules and their deps are in the image",
        "module: virtio_balloon loaded at coldplug, device bound",
        "firmware: a request for a file the image has succeeds",
        "firmware: a request for a missing file gets the kernel's -2",
        "coldplug: the data disk has its rule's owner, group, mode and links",
        "hotplug: a disk plugged in through QMP gets its rule's mode and link in time",
        "module: virtio_console loaded at hotplug",
        "hotplug: device_del removes the node and link; the add and remove commands ran once each",
    ] {
        let row = rows
            .iter()
            .find(|r| r.starts_with(shown(want)))
            .unwrap_or_else(|| panic!("no row '{want}':\n{stdout}"));
        assert_eq!(row.matches("pass").count(), 4, "{row}");
    }
    assert_every_row_passes(&rows, 4);
}

#[test]
fn devices_rows_pass_on_every_backend_on_x86_64() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-x86_64", "qemu-system-x86");
    devices_pass_on("qemu-x86_64");
}

#[test]
fn devices_rows_pass_on_every_backend_on_aarch64() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-aarch64", "qemu-system-arm");
    devices_pass_on("qemu-aarch64");
}

/// Backends that leave their mounts mounted at poweroff, load no module by modalias and apply no
/// device rule: the disk's FAT dirty bit stays set, the balloon's driver is not loaded (nor
/// virtio_console at hotplug), the disks keep devtmpfs' mode without links, and the host's rows
/// say so. Both paths: the shell backends' (busybox, mdev) and bonsai-init's own.
#[test]
fn backends_that_do_not_unmount_or_coldplug_fail_those_rows() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-x86_64", "qemu-system-x86");
    let out = xtask(&[
        "conformance",
        "--profile",
        "devices",
        "--init",
        "busybox",
        "--init",
        "bonsai-init",
        "--broken",
        "no-unmount,no-coldplug,no-device-rules",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the broken backends passed:\n{stdout}"
    );
    let rows = matrix_rows(&stdout);
    let row = |name: &str| {
        *rows
            .iter()
            .find(|r| r.starts_with(shown(name)))
            .unwrap_or_else(|| panic!("no row '{name}':\n{stdout}"))
    };
    for failing in [
        "mount: the filesystem is clean after poweroff",
        "module: virtio_balloon loaded at coldplug, device bound",
        "console shows 'bonsai: module virtio_balloon loaded for",
        "module: virtio_console loaded at hotplug",
        "coldplug: the data disk has its rule's owner, group, mode and links",
        "hotplug: a disk plugged in through QMP gets its rule's mode and link in time",
        "hotplug: device_del removes the node and link; the add and remove commands ran once each",
    ] {
        assert_eq!(row(failing).matches("FAIL").count(), 2, "{}", row(failing));
    }
    assert!(stderr.contains("dirty bit is set"), "{stderr}");
    // What the faults do not touch still passes: the data was written and read back, and the
    // module is in the image.
    for passing in [
        "mount: this boot reads what the last one wrote",
        "module: only named modules and their deps are in the image",
    ] {
        assert_eq!(row(passing).matches("pass").count(), 2, "{}", row(passing));
    }
}

#[test]
fn kernel_config_report_shows_the_modules() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("nix-build", "nix-bin");
    for board in ["qemu-x86_64", "qemu-aarch64"] {
        let report = ok(&["kernel-config", "--board", board]);
        for option in [
            "CONFIG_VIRTIO_BALLOON",
            "CONFIG_VIRTIO_CONSOLE",
            "CONFIG_TEST_FIRMWARE",
        ] {
            let line = report
                .lines()
                .find(|l| l.split_whitespace().next() == Some(option))
                .unwrap_or_else(|| panic!("{board}: no {option} line:\n{report}"));
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[1..3], ["m", "m"], "{board}: {line}");
            assert!(line.trim_end().ends_with("ok"), "{board}: {line}");
            assert!(
                report
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{option}=m "))),
                "{board}: {option} is not in the modules list:\n{report}"
            );
        }
    }
}
