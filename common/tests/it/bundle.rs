//! Bundles from outside: hostile archives built header by header, archives
//! made by GNU tar, and property tests of the reader and the round trip.

use std::fs;
use std::io::Write;
use std::process::Command;

use flate2::write::GzEncoder;
use flate2::Compression;
use muster_common::bundle::{Bundle, BundleError, Entry, Limits};
use proptest::prelude::*;
use tar::{EntryType, Header};

/// Appends one raw tar record. The name and link are copied into the header
/// bytes directly, bypassing the `tar` crate's own path checks, so archives
/// can say anything a hostile producer could.
fn record(out: &mut Vec<u8>, name: &[u8], kind: EntryType, data: &[u8], link: Option<&[u8]>) {
    record_with_size(out, name, kind, data, link, data.len() as u64);
}

fn record_with_size(
    out: &mut Vec<u8>,
    name: &[u8],
    kind: EntryType,
    data: &[u8],
    link: Option<&[u8]>,
    size: u64,
) {
    let mut header = Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(size);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn finish(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// `(name, type, data, link target)` of one raw record.
type Record<'a> = (&'a [u8], EntryType, &'a [u8], Option<&'a [u8]>);

fn archive(records: &[Record]) -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, kind, data, link) in records {
        record(&mut tar, name, *kind, data, *link);
    }
    gz(&finish(tar))
}

fn read(bytes: &[u8]) -> Result<Bundle, BundleError> {
    Bundle::from_tar_gz(bytes, &Limits::default())
}

const POLY: &[u8] = b"name: x\n";

#[test]
fn accepts_a_plain_archive_with_directory_entries() {
    let bytes = archive(&[
        (b"./", EntryType::Directory, b"", None),
        (b"./workspace.poly", EntryType::Regular, POLY, None),
        (b"./blocks/", EntryType::Directory, b"", None),
        (b"./blocks/x/", EntryType::Directory, b"", None),
        (b"./blocks/x/block.poly", EntryType::Regular, POLY, None),
        (b"./blocks/current", EntryType::Symlink, b"", Some(b"x")),
        (b"empty/", EntryType::Directory, b"", None),
    ]);
    let bundle = read(&bytes).unwrap();
    let paths: Vec<&str> = bundle.files().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        ["blocks/current", "blocks/x/block.poly", "workspace.poly"]
    );
    assert_eq!(bundle.read("blocks/current/block.poly"), Some(POLY));
}

#[test]
fn rejects_absolute_paths() {
    let err = read(&archive(&[(
        b"/etc/passwd",
        EntryType::Regular,
        b"x",
        None,
    )]))
    .unwrap_err();
    assert!(matches!(err, BundleError::UnsafePath { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "unsafe path '/etc/passwd': expected a relative path, found an absolute one"
    );
}

#[test]
fn rejects_parent_components() {
    for name in [&b"../x"[..], b"a/../../x", b"ok/../x", b".."] {
        let err = read(&archive(&[(name, EntryType::Regular, b"x", None)])).unwrap_err();
        let shown = String::from_utf8_lossy(name);
        assert!(matches!(err, BundleError::UnsafePath { .. }), "{err}");
        assert!(err.to_string().contains(&format!("'{shown}'")), "{err}");
        assert!(err.to_string().contains("'..'"), "{err}");
    }
    let err = read(&archive(&[(b"../d/", EntryType::Directory, b"", None)])).unwrap_err();
    assert!(err.to_string().contains("'../d/'"), "{err}");
}

#[test]
fn rejects_symlinks_that_escape() {
    let err = read(&archive(&[(
        b"x",
        EntryType::Symlink,
        b"",
        Some(b"../../etc"),
    )]))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsafe path 'x': expected a symlink target inside the workspace, found '../../etc', which resolves outside it"
    );
    let err = read(&archive(&[(
        b"a/b/c",
        EntryType::Symlink,
        b"",
        Some(b"../../../x"),
    )]))
    .unwrap_err();
    assert!(err.to_string().contains("'a/b/c'"), "{err}");
    let err = read(&archive(&[(
        b"abs",
        EntryType::Symlink,
        b"",
        Some(b"/etc/passwd"),
    )]))
    .unwrap_err();
    assert!(
        err.to_string().contains("'abs'") && err.to_string().contains("absolute"),
        "{err}"
    );
    // A file written through a symlink would land wherever it points.
    let err = read(&archive(&[
        (b"d", EntryType::Symlink, b"", Some(b"sub")),
        (b"d/x", EntryType::Regular, b"x", None),
    ]))
    .unwrap_err();
    assert!(
        matches!(err, BundleError::PathConflict { ref path, .. } if path == "d/x"),
        "{err}"
    );
}

#[test]
fn rejects_hard_links() {
    let err = read(&archive(&[
        (b"workspace.poly", EntryType::Regular, POLY, None),
        (b"h", EntryType::Link, b"", Some(b"workspace.poly")),
    ]))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry 'h': expected a regular file, a directory or a symlink, found a hard link"
    );
}

#[test]
fn rejects_devices_and_fifos() {
    for (kind, name) in [
        (EntryType::Char, "a character device"),
        (EntryType::Block, "a block device"),
        (EntryType::Fifo, "a fifo"),
    ] {
        let err = read(&archive(&[(b"dev/node", kind, b"", None)])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "entry 'dev/node': expected a regular file, a directory or a symlink, found {name}"
            )
        );
    }
}

#[test]
fn rejects_duplicate_paths() {
    let err = read(&archive(&[
        (b"a", EntryType::Regular, b"1", None),
        (b"./a", EntryType::Regular, b"2", None),
    ]))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry 'a' appears more than once: expected each path once"
    );
    let err = read(&archive(&[
        (b"a/", EntryType::Directory, b"", None),
        (b"a", EntryType::Regular, b"2", None),
    ]))
    .unwrap_err();
    assert!(
        matches!(err, BundleError::DuplicatePath { ref path } if path == "a"),
        "{err}"
    );
}

#[test]
fn rejects_an_entry_larger_than_the_limit_before_reading_it() {
    let limits = Limits {
        max_unpacked_bytes: 1024,
        ..Limits::default()
    };
    let bytes = archive(&[(b"big.bin", EntryType::Regular, &[0u8; 4096], None)]);
    let err = Bundle::from_tar_gz(&bytes, &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry 'big.bin' (4096 bytes) exceeds the limit of 1024"
    );
}

#[test]
fn stops_a_gzip_bomb_at_the_unpacked_limit() {
    // Small limits: four entries each under the limit, together over it.
    let limits = Limits {
        max_unpacked_bytes: 1 << 20,
        ..Limits::default()
    };
    let chunk = vec![0u8; 512 << 10];
    let bytes = archive(&[
        (b"one", EntryType::Regular, &chunk, None),
        (b"two", EntryType::Regular, &chunk, None),
        (b"three", EntryType::Regular, &chunk, None),
        (b"four", EntryType::Regular, &chunk, None),
    ]);
    let err = Bundle::from_tar_gz(&bytes, &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unpacked bundle (at entry 'two') exceeds the limit of 1048576"
    );
}

#[test]
fn stops_a_gzip_bomb_at_the_default_limit() {
    // 300 MiB of zeros compress to well under a megabyte. Each entry is below
    // the 256 MiB default, so only counting while inflating can stop it.
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for name in [&b"bomb-a"[..], b"bomb-b"] {
        let mut header = Vec::new();
        record_with_size(&mut header, name, EntryType::Regular, b"", None, 150 << 20);
        enc.write_all(&header).unwrap();
        for _ in 0..150 {
            enc.write_all(&zeros).unwrap();
        }
    }
    enc.write_all(&[0u8; 1024]).unwrap();
    let bytes = enc.finish().unwrap();
    assert!(bytes.len() < 2 << 20, "the bomb is small: {}", bytes.len());
    let err = read(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("'bomb-b'"), "{err}");
}

#[test]
fn rejects_too_many_entries_and_too_large_uploads() {
    let limits = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let bytes = archive(&[
        (b"a", EntryType::Regular, b"", None),
        (b"b", EntryType::Regular, b"", None),
        (b"c/", EntryType::Directory, b"", None),
        (b"d", EntryType::Regular, b"", None),
    ]);
    let err = Bundle::from_tar_gz(&bytes, &limits).unwrap_err();
    assert_eq!(
        err.to_string(),
        "number of entries (at entry 'd') exceeds the limit of 3"
    );

    let limits = Limits {
        max_compressed_bytes: 16,
        ..Limits::default()
    };
    let err = Bundle::from_tar_gz(&bytes, &limits).unwrap_err();
    assert!(
        matches!(err, BundleError::TooLarge { limit: 16, .. }),
        "{err}"
    );
}

#[test]
fn tells_apart_not_gzip_corrupt_gzip_and_not_tar() {
    assert!(matches!(
        read(b"plain text").unwrap_err(),
        BundleError::NotGzip
    ));
    assert!(matches!(read(b"").unwrap_err(), BundleError::NotGzip));
    let err = read(&gz(&[b'x'; 2048])).unwrap_err();
    assert!(matches!(err, BundleError::NotTar(_)), "{err}");

    let mut corrupt = gz(&finish(Vec::new()));
    let n = corrupt.len();
    corrupt[n - 6] ^= 0xff; // inside the CRC-32 trailer
    let err = read(&corrupt).unwrap_err();
    assert!(matches!(err, BundleError::CorruptGzip(_)), "{err}");

    let mut garbage = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    garbage.extend_from_slice(&[0xff; 64]);
    let err = read(&garbage).unwrap_err();
    assert!(matches!(err, BundleError::CorruptGzip(_)), "{err}");
}

#[test]
fn reads_gnu_tar_archives_like_the_directory_they_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    let deep = format!("blocks/{}/{}", "n".repeat(90), "m".repeat(60));
    fs::create_dir_all(root.join(&deep)).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("workspace.poly"), POLY).unwrap();
    fs::write(root.join(&deep).join("block.poly"), POLY).unwrap();
    let script = root.join("run.sh");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o750)).unwrap();
    }
    std::os::unix::fs::symlink("workspace.poly", root.join("link.poly")).unwrap();
    // ustar has 100 bytes for a link target; this one fits.
    std::os::unix::fs::symlink("n".repeat(90), root.join("blocks/alias")).unwrap();
    let expected = Bundle::from_dir(&root).unwrap();

    for format in ["gnu", "pax", "ustar"] {
        let out = dir.path().join(format!("{format}.tgz"));
        let status = Command::new("tar")
            .arg(format!("--format={format}"))
            .arg("-C")
            .arg(&root)
            .arg("-czf")
            .arg(&out)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success(), "tar --format={format}");
        let bundle = read(&fs::read(&out).unwrap()).unwrap();
        assert_eq!(bundle, expected, "tar --format={format}");
        assert_eq!(bundle.digest(), expected.digest(), "tar --format={format}");
    }

    // And GNU tar reads ours back to the same tree.
    let ours = dir.path().join("ours.tgz");
    fs::write(&ours, expected.to_tar_gz()).unwrap();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    let status = Command::new("tar")
        .arg("-C")
        .arg(&back)
        .arg("-xzf")
        .arg(&ours)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(Bundle::from_dir(&back).unwrap(), expected);
}

fn component() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,12}".prop_filter("not . or ..", |c| c != "." && c != "..")
}

fn rel_path() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..4).prop_map(|parts| parts.join("/"))
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => (prop::collection::vec(any::<u8>(), 0..600), any::<bool>())
            .prop_map(|(data, executable)| Entry::File { data, executable }),
        1 => prop_oneof![rel_path(), rel_path().prop_map(|p| format!("../{p}"))]
            .prop_map(|target| Entry::Symlink { target }),
    ]
}

fn bundle() -> impl Strategy<Value = Bundle> {
    prop::collection::vec((rel_path(), entry()), 0..12)
        .prop_filter_map("a valid tree", |entries| Bundle::from_entries(entries).ok())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn round_trip_keeps_content_and_digest(b in bundle()) {
        let gz = b.to_tar_gz();
        let back = Bundle::from_tar_gz(&gz, &Limits::default()).unwrap();
        prop_assert_eq!(back.digest(), b.digest());
        prop_assert_eq!(&back, &b);
        // Any producer: the same content re-compressed differently.
        let mut tar = Vec::new();
        b.write_tar_with_prefix("", &mut tar).unwrap();
        let other = Bundle::from_tar_gz(&gz_best(&tar), &Limits::default()).unwrap();
        prop_assert_eq!(other.digest(), b.digest());
    }

    #[test]
    fn insertion_order_does_not_change_the_digest(b in bundle()) {
        let mut entries: Vec<(String, Entry)> =
            b.files().map(|(p, e)| (p.to_owned(), e.clone())).collect();
        entries.reverse();
        let again = Bundle::from_entries(entries).unwrap();
        prop_assert_eq!(again.digest(), b.digest());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Bundle::from_tar_gz(&bytes, &Limits::default());
        let mut with_magic = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
        with_magic.extend_from_slice(&bytes);
        let _ = Bundle::from_tar_gz(&with_magic, &Limits::default());
        let _ = Bundle::from_tar_gz(&gz(&bytes), &Limits::default());
    }

    #[test]
    fn mutated_archives_never_panic_and_what_is_accepted_is_sound(
        b in bundle(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        mutate_compressed in any::<bool>(),
    ) {
        let mut tar = Vec::new();
        b.write_tar_with_prefix("", &mut tar).unwrap();
        let bytes = if mutate_compressed {
            let mut bytes = gz(&tar);
            for (at, value) in &flips {
                let i = at.index(bytes.len());
                bytes[i] = *value;
            }
            bytes
        } else {
            for (at, value) in &flips {
                let i = at.index(tar.len());
                tar[i] = *value;
            }
            gz(&tar)
        };
        if let Ok(accepted) = Bundle::from_tar_gz(&bytes, &Limits::default()) {
            let again = Bundle::from_tar_gz(&accepted.to_tar_gz(), &Limits::default()).unwrap();
            prop_assert_eq!(again, accepted);
        }
    }
}

fn gz_best(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}
