use super::*;

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(feature = "sign")]
fn key(n: u8) -> SecretKey {
    SecretKey::from_random(&[n; 40])
}

#[cfg(feature = "sign")]
fn bundle(k: &SecretKey, board: &str, version: &str, linux: &[u8], initrd: &[u8]) -> Vec<u8> {
    let (m, payload) = Manifest::build(
        board,
        version,
        Chunking::default(),
        &[("linux", linux), ("initrd", initrd)],
    )
    .unwrap();
    let mb = m.to_bytes();
    let sig = k.sign(&mb, "bonsai bundle").unwrap();
    assemble(&mb, sig.as_bytes(), &payload)
}

#[test]
fn chunks_are_cut_by_content_and_an_insert_moves_few_boundaries() {
    let c = Chunking::default();
    let a = pseudo(1 << 20, 7);
    let mut b = a.clone();
    b.splice(300_000..300_000, pseudo(5000, 9));
    let ha: std::collections::HashSet<String> = c
        .cut(&a)
        .iter()
        .map(|&(o, l)| sha256_hex(&a[o..o + l]))
        .collect();
    let cb = c.cut(&b);
    let new: usize = cb
        .iter()
        .filter(|&&(o, l)| !ha.contains(&sha256_hex(&b[o..o + l])))
        .map(|&(_, l)| l)
        .sum();
    assert!(cb.iter().all(|&(_, l)| l <= c.max as usize));
    assert_eq!(cb.iter().map(|&(_, l)| l).sum::<usize>(), b.len());
    // 5000 inserted bytes cost at most a few average chunks, not the megabyte.
    assert!(new < 5000 + 4 * c.avg as usize, "{new} new bytes");
}

#[test]
fn a_manifest_round_trips_and_its_files_reassemble() {
    let linux = pseudo(300_000, 1);
    let mut initrd = pseudo(500_000, 2);
    initrd.extend_from_slice(&linux[..100_000]); // shared content is stored once
    let (m, payload) = Manifest::build(
        "b",
        "1",
        Chunking::default(),
        &[("linux", &linux), ("initrd", &initrd)],
    )
    .unwrap();
    assert!(payload.len() < linux.len() + initrd.len());
    assert_eq!(payload.len() as u64, m.payload_len());
    let back = Manifest::parse(&m.to_bytes()).unwrap();
    assert_eq!(back, m);
    let mut store = Store::default();
    assert_eq!(store.put_range(&m, 0, &payload).unwrap(), m.chunks.len());
    assert_eq!(store.file(&m, "linux").unwrap(), linux);
    assert_eq!(store.file(&m, "initrd").unwrap(), initrd);
}

#[test]
fn inconsistent_manifests_are_refused_by_name() {
    let (m, _) = Manifest::build(
        "b",
        "1",
        Chunking::default(),
        &[("linux", &pseudo(70_000, 1)), ("initrd", &pseudo(9, 2))],
    )
    .unwrap();
    let mut bad = m.clone();
    bad.files[0].size += 1;
    assert!(Manifest::parse(&bad.to_bytes())
        .unwrap_err()
        .0
        .contains("file linux"));
    let mut bad = m.clone();
    bad.files[1].chunks.push(99);
    assert!(Manifest::parse(&bad.to_bytes())
        .unwrap_err()
        .0
        .contains("chunk 99"));
    let mut bad = m.clone();
    bad.chunks[1].offset += 1;
    assert!(Manifest::parse(&bad.to_bytes())
        .unwrap_err()
        .0
        .contains("chunk 1"));
    let mut bad = m;
    bad.files.remove(1);
    assert!(Manifest::parse(&bad.to_bytes())
        .unwrap_err()
        .0
        .contains("initrd"));
    assert!(Manifest::parse(b"{}")
        .unwrap_err()
        .0
        .starts_with("manifest:"));
}

#[test]
fn a_corrupted_chunk_is_refused_and_not_kept() {
    let data = pseudo(200_000, 3);
    let (m, mut payload) = Manifest::build(
        "b",
        "1",
        Chunking::default(),
        &[("linux", &data), ("initrd", &data)],
    )
    .unwrap();
    let at = m.chunks[2].offset as usize + 10;
    payload[at] ^= 1;
    let mut store = Store::default();
    let e = store.put_range(&m, 0, &payload).unwrap_err();
    assert!(e.0.starts_with("chunk 2 "), "{e}");
    assert!(!store.has(2));
}

#[test]
fn the_plan_fetches_only_missing_chunks_in_merged_ranges() {
    let old = pseudo(400_000, 4);
    let mut new = old.clone();
    new[200_000..200_100].copy_from_slice(&pseudo(100, 5));
    let c = Chunking::default();
    let (m, payload) =
        Manifest::build("b", "2", c, &[("linux", &new), ("initrd", &old[..1000])]).unwrap();
    let mut local = Local::default();
    local.add("a/linux", old.clone(), &c);
    let plan = Plan::new(&m, |h| local.get(h).is_some());
    assert!(plan.fetch_bytes > 0 && plan.fetch_bytes <= 2 * u64::from(c.max));
    assert_eq!(plan.fetch_bytes + plan.reuse_bytes, m.payload_len());
    let mut store = Store::default();
    for &i in &plan.reuse {
        store
            .put(&m, i, local.get(&m.chunks[i as usize].sha256).unwrap())
            .unwrap();
    }
    for (off, len) in plan.ranges(&m) {
        store
            .put_range(&m, off, &payload[off as usize..(off + len) as usize])
            .unwrap();
    }
    assert_eq!(store.file(&m, "linux").unwrap(), new);
}

#[test]
fn versions_order_numerically() {
    use std::cmp::Ordering::*;
    assert_eq!(compare_versions("1.10.0", "1.9.3"), Greater);
    assert_eq!(compare_versions("1.0.0", "1.0.0"), Equal);
    assert_eq!(compare_versions("0.9", "1.0"), Less);
    assert_eq!(compare_versions("1.0.1", "1.0"), Greater);
    assert_eq!(compare_versions("r2", "r10"), Less);
}

#[cfg(feature = "sign")]
mod signed {
    use super::*;

    #[test]
    fn keys_round_trip_and_damage_is_refused() {
        let k = key(1);
        let back = SecretKey::parse(&k.to_file()).unwrap();
        assert_eq!(back.public_file(), k.public_file());
        let mut text = k.to_file();
        let at = text.len() - 5;
        text.replace_range(at..at + 1, if &text[at..at + 1] == "A" { "B" } else { "A" });
        assert!(SecretKey::parse(&text).is_err());
        assert!(PublicKey::parse(&k.public_file()).unwrap().id == k.id());
    }

    #[test]
    fn a_bundle_verifies_and_every_tampering_is_refused() {
        let k = key(2);
        let pk = PublicKey::parse(&k.public_file()).unwrap();
        let b = bundle(&k, "board", "1.0", &pseudo(100_000, 1), &pseudo(50_000, 2));
        let v = verify_head(&b, &pk).unwrap();
        assert_eq!(v.manifest.board, "board");
        // A byte of the manifest changed: the signature no longer covers it.
        let mut t = b.clone();
        let at = HEADER_LEN as usize + 40;
        t[at] ^= 1;
        assert!(verify_head(&t, &pk).unwrap_err().0.starts_with("signature"));
        // Another key.
        let other = PublicKey::parse(&key(3).public_file()).unwrap();
        assert!(verify_head(&b, &other)
            .unwrap_err()
            .0
            .contains("another key"));
        // Truncated inside the head, and not a bundle at all.
        let end = v.header.payload_offset() as usize;
        assert!(verify_head(&b[..end - 1], &pk)
            .unwrap_err()
            .0
            .contains("truncated"));
        assert!(verify_head(b"hello", &pk)
            .unwrap_err()
            .0
            .contains("not a bonsai bundle"));
    }

    #[test]
    fn signing_is_deterministic() {
        let k = key(4);
        assert_eq!(k.sign(b"m", "c").unwrap(), k.sign(b"m", "c").unwrap());
    }
}
