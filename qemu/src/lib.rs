//! Boots a bonsai image in QEMU, reads its serial console and judges the run.
//!
//! - [`spec`]: the one QEMU command per board ([`QemuSpec`]).
//! - [`protocol`]: the markers the guest prints on its console, and the host's parser.
//! - [`qmp`]: QEMU's machine protocol, for adding and removing devices while a guest runs.
//! - [`run`]: booting for a person ([`boot_interactive`]) or for checks ([`boot_check`]).
//!
//! **Architecture Invariant:** this crate spawns QEMU and nothing else (its tests spawn fake
//! QEMU scripts), and never trusts QEMU's exit status alone.

pub mod protocol;
pub mod qmp;
pub mod run;
pub mod spec;

pub use run::{boot_check, boot_interactive, Check, CheckResult, Event, Expect, Failure, Report};
pub use spec::{Accel, Firmware, Mode, QemuSpec, UserNet};
