//! Debian's minisign as the oracle of bonsai's key and signature formats, both ways: it verifies
//! bonsai's signatures, and signs with bonsai's secret key for bonsai to verify. The full test
//! command installs minisign (`cargo xtask test`); without it this test fails, never passes.

use std::ffi::OsStr;
use std::process::{Command, Output};

use bundle::{PublicKey, SecretKey};

fn minisign(args: &[&OsStr]) -> Output {
    Command::new("minisign")
        .args(args)
        .output()
        .expect("minisign must be installed (apt-get install minisign)")
}

#[test]
fn minisign_verifies_ours_and_signs_with_our_key() {
    let dir = tempfile::tempdir().unwrap();
    let k = SecretKey::from_random(&[5; 40]);
    let (pubf, secf, msg) = (
        dir.path().join("k.pub"),
        dir.path().join("k.key"),
        dir.path().join("m"),
    );
    std::fs::write(&pubf, k.public_file()).unwrap();
    std::fs::write(&secf, k.to_file()).unwrap();
    std::fs::write(&msg, b"a manifest\n").unwrap();
    std::fs::write(
        dir.path().join("m.minisig"),
        k.sign(b"a manifest\n", "board x version 1").unwrap(),
    )
    .unwrap();
    let verify = || {
        minisign(&[
            "-Vm".as_ref(),
            msg.as_os_str(),
            "-p".as_ref(),
            pubf.as_os_str(),
        ])
    };
    let o = verify();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("board x version 1"));
    // A changed message fails under minisign too.
    std::fs::write(&msg, b"a manifest!\n").unwrap();
    assert!(!verify().status.success());
    // minisign signs with our key file (unencrypted: no password prompt); we verify it.
    std::fs::remove_file(dir.path().join("m.minisig")).unwrap();
    let o = minisign(&[
        "-S".as_ref(),
        "-s".as_ref(),
        secf.as_os_str(),
        "-m".as_ref(),
        msg.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sig = std::fs::read_to_string(dir.path().join("m.minisig")).unwrap();
    let pk = PublicKey::parse(&k.public_file()).unwrap();
    pk.verify(b"a manifest!\n", &sig).unwrap();
    assert!(pk.verify(b"a manifest\n", &sig).is_err());
}
