//! Workspace bundles: a workspace directory as a deterministic archive with a
//! content digest.
//!
//! A [`Bundle`] is an in-memory tree of regular files and symlinks, keyed by
//! their workspace-relative path. It is built from a directory on disk (the CLI
//! pushing a workspace) or from an uploaded `.tar.gz` (the coordinator accepting
//! one), and written out as a canonical archive whose SHA-256 digest identifies
//! the content: runs pin that digest and runners cache bundles by it.
//!
//! Archives come from outside, so reading one is defensive: paths must stay
//! inside the workspace, symlinks must not point out of it, only regular files,
//! directories and symlinks are accepted, and every size is bounded while
//! reading, so a decompression bomb stops at the limit instead of filling
//! memory. Every rejection names the entry it is about.
//!
//! Invariants of a `Bundle`, established by every constructor:
//! - keys are canonical relative paths: `/`-separated, no empty, `.` or `..`
//!   component, no leading `/`, at most [`MAX_PATH_BYTES`] bytes;
//! - no entry lies below another entry (a file or symlink is never used as a
//!   directory), so writing a bundle to disk never passes through a symlink it
//!   created;
//! - symlink targets are relative, normalised (no empty or `.` components), and
//!   resolve inside the bundle root, also when resolution passes through other
//!   symlinks of the bundle.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

/// Longest accepted path or symlink target, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// How many symlinks one resolution may pass through before it is treated as
/// a loop (the kernel's limit for `ELOOP`).
const MAX_SYMLINK_HOPS: usize = 40;

/// Total path components the symlink check may walk for one bundle. Real
/// workspaces need a few hundred at most; the budget keeps a hostile archive
/// of long, interlinked symlinks from turning validation into a CPU sink.
const SYMLINK_STEP_BUDGET: usize = 200_000;

/// The gzip level of [`Bundle::to_tar_gz`]. Fixed so one build of Muster
/// always produces the same bytes; the digest does not depend on it anyway.
const GZIP_LEVEL: u32 = 6;

const BLOCK: usize = 512;

/// Bounds applied while reading an archive from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `.tar.gz`, checked before decompressing.
    pub max_compressed_bytes: u64,
    /// Largest decompressed tar stream (headers, padding and file data); reading
    /// stops as soon as it is exceeded.
    pub max_unpacked_bytes: u64,
    /// Most entries (files, directories, symlinks) in one archive.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_compressed_bytes: 64 << 20,
            max_unpacked_bytes: 256 << 20,
            max_entries: 20_000,
        }
    }
}

/// One entry of a bundle. Directories are implied by the paths of their
/// contents and never stored, so an empty directory is not part of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file. Only the executable bit survives from its mode, because
    /// that is the only permission a workspace's content depends on.
    File { data: Vec<u8>, executable: bool },
    /// A symlink with a relative target that resolves inside the bundle.
    Symlink { target: String },
}

/// A workspace as a set of files and symlinks; see the module documentation
/// for its invariants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bundle {
    files: BTreeMap<String, Entry>,
}

/// Why a bundle could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not gzip data: expected the gzip magic bytes 1f 8b at the start")]
    NotGzip,
    #[error("bundle's gzip stream is corrupt: {0}")]
    CorruptGzip(String),
    #[error("bundle is not a valid tar archive: {0}")]
    NotTar(String),
    #[error("unsafe path '{path}': {reason}")]
    UnsafePath { path: String, reason: String },
    #[error("entry '{path}': expected a regular file, a directory or a symlink, found {kind}")]
    UnsupportedEntry { path: String, kind: String },
    #[error("entry '{path}' appears more than once: expected each path once")]
    DuplicatePath { path: String },
    #[error(
        "entry '{path}' lies inside '{other}', which is not a directory: expected '{other}' to be a directory"
    )]
    PathConflict { path: String, other: String },
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: String, limit: u64 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl Bundle {
    /// Builds a bundle from a workspace directory.
    ///
    /// `.git` (at any depth: repositories and submodules) and the root `.logs/`
    /// (Polycrate's local transaction logs) are skipped, because neither is
    /// workspace content and both change on every run. Symlinks are stored as
    /// symlinks, never followed; one whose target is absolute or resolves
    /// outside `root` is rejected, as is any file that is neither a regular
    /// file, a directory nor a symlink.
    pub fn from_dir(root: &Path) -> Result<Bundle, BundleError> {
        let io_err = |source| BundleError::Io {
            path: root.display().to_string(),
            source,
        };
        let meta = fs::metadata(root).map_err(io_err)?;
        if !meta.is_dir() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "expected a workspace directory, found a file",
            )));
        }
        let mut bundle = Bundle::default();
        bundle.walk_dir(root, "")?;
        bundle.check_tree(&BTreeSet::new())?;
        Ok(bundle)
    }

    fn walk_dir(&mut self, dir: &Path, rel: &str) -> Result<(), BundleError> {
        let io_err = |path: &Path, source| BundleError::Io {
            path: path.display().to_string(),
            source,
        };
        let reader = fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
        for item in reader {
            let item = item.map_err(|e| io_err(dir, e))?;
            let abs = item.path();
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                return Err(BundleError::UnsafePath {
                    path: join(rel, &name.to_string_lossy()),
                    reason: "expected a UTF-8 file name".into(),
                });
            };
            if name == ".git" || (rel.is_empty() && name == ".logs") {
                continue;
            }
            let path = join(rel, name);
            let file_type = item.file_type().map_err(|e| io_err(&abs, e))?;
            if file_type.is_dir() {
                self.walk_dir(&abs, &path)?;
            } else if file_type.is_file() {
                let meta = item.metadata().map_err(|e| io_err(&abs, e))?;
                let data = fs::read(&abs).map_err(|e| io_err(&abs, e))?;
                self.insert(
                    &path,
                    Entry::File {
                        data,
                        executable: is_executable(&meta),
                    },
                )?;
            } else if file_type.is_symlink() {
                let target = fs::read_link(&abs).map_err(|e| io_err(&abs, e))?;
                let Some(target) = target.to_str() else {
                    return Err(BundleError::UnsafePath {
                        path,
                        reason: "expected a UTF-8 symlink target".into(),
                    });
                };
                self.insert(
                    &path,
                    Entry::Symlink {
                        target: target.to_owned(),
                    },
                )?;
            } else {
                return Err(BundleError::UnsupportedEntry {
                    path,
                    kind: special_file_kind(&file_type).into(),
                });
            }
        }
        Ok(())
    }

    /// Reads a gzip-compressed tar archive from any producer (GNU tar, BSD tar,
    /// [`Bundle::to_tar_gz`]), enforcing `limits` while decompressing.
    ///
    /// Leading `./` and `.` components are dropped; absolute paths, `..`
    /// components, hard links, devices, fifos, sparse files, symlinks that
    /// escape the root, duplicate paths and paths used both as a file and as a
    /// directory are rejected. Directory entries are accepted and ignored
    /// (their mode and times do not survive).
    pub fn from_tar_gz(bytes: &[u8], limits: &Limits) -> Result<Bundle, BundleError> {
        if bytes.len() as u64 > limits.max_compressed_bytes {
            return Err(BundleError::TooLarge {
                what: format!("compressed bundle ({} bytes)", bytes.len()),
                limit: limits.max_compressed_bytes,
            });
        }
        if !bytes.starts_with(&[0x1f, 0x8b]) {
            return Err(BundleError::NotGzip);
        }
        let exceeded = Cell::new(false);
        let gzip_error = Cell::new(None);
        let reader = LimitedReader {
            inner: MultiGzDecoder::new(bytes),
            read: 0,
            limit: limits.max_unpacked_bytes,
            exceeded: &exceeded,
            gzip_error: &gzip_error,
        };
        // Errors surface from the tar reader, which may wrap the underlying
        // cause in its own message; the cells tell which layer actually failed.
        let classify = |err: io::Error, at: Option<&str>| -> BundleError {
            let at = at.map(|p| format!(" (at entry '{p}')")).unwrap_or_default();
            if exceeded.get() {
                BundleError::TooLarge {
                    what: format!("unpacked bundle{at}"),
                    limit: limits.max_unpacked_bytes,
                }
            } else if let Some(msg) = gzip_error.take() {
                BundleError::CorruptGzip(format!("{msg}{at}"))
            } else {
                BundleError::NotTar(format!("{err}{at}"))
            }
        };

        let mut bundle = Bundle::default();
        let mut dirs = BTreeSet::new();
        let mut archive = tar::Archive::new(reader);
        let mut last_path: Option<String> = None;
        let mut count = 0usize;
        {
            let entries = archive.entries().map_err(|e| classify(e, None))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| classify(e, last_path.as_deref()))?;
                let raw_path = entry.path_bytes().into_owned();
                let shown = String::from_utf8_lossy(&raw_path).into_owned();
                last_path = Some(shown.clone());
                count += 1;
                if count > limits.max_entries {
                    return Err(BundleError::TooLarge {
                        what: format!("number of entries (at entry '{shown}')"),
                        limit: limits.max_entries as u64,
                    });
                }
                let entry_type = entry.header().entry_type();
                match entry_type {
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        let size = entry.size();
                        if size > limits.max_unpacked_bytes {
                            return Err(BundleError::TooLarge {
                                what: format!("entry '{shown}' ({size} bytes)"),
                                limit: limits.max_unpacked_bytes,
                            });
                        }
                        let Some(path) = normalize_path(&raw_path)? else {
                            return Err(BundleError::UnsafePath {
                                path: shown,
                                reason: "expected a file path, found the workspace root".into(),
                            });
                        };
                        let mode = entry.header().mode().map_err(|e| {
                            BundleError::NotTar(format!("entry '{shown}' has an invalid mode: {e}"))
                        })?;
                        // Read without trusting the header's size for the
                        // allocation; the limited reader bounds the total.
                        let mut data = Vec::new();
                        entry
                            .read_to_end(&mut data)
                            .map_err(|e| classify(e, Some(&shown)))?;
                        bundle.insert(
                            &path,
                            Entry::File {
                                data,
                                executable: mode & 0o111 != 0,
                            },
                        )?;
                    }
                    tar::EntryType::Directory => {
                        if let Some(path) = normalize_path(&raw_path)? {
                            dirs.insert(path);
                        }
                    }
                    tar::EntryType::Symlink => {
                        let Some(path) = normalize_path(&raw_path)? else {
                            return Err(BundleError::UnsafePath {
                                path: shown,
                                reason: "expected a symlink path, found the workspace root".into(),
                            });
                        };
                        let Some(target) = entry.link_name_bytes() else {
                            return Err(BundleError::NotTar(format!(
                                "symlink '{shown}' has no target"
                            )));
                        };
                        let Ok(target) = String::from_utf8(target.into_owned()) else {
                            return Err(BundleError::UnsafePath {
                                path: shown,
                                reason: "expected a UTF-8 symlink target".into(),
                            });
                        };
                        bundle.insert(&path, Entry::Symlink { target })?;
                    }
                    // A pax global header only carries metadata defaults for
                    // the entries that follow; nothing of it is kept.
                    tar::EntryType::XGlobalHeader => {}
                    other => {
                        return Err(BundleError::UnsupportedEntry {
                            path: shown,
                            kind: entry_kind_name(other),
                        });
                    }
                }
            }
        }
        // Drain what follows the end-of-archive marker, so the gzip trailer's
        // checksum is verified and a corrupt stream is not accepted silently.
        let mut reader = archive.into_inner();
        io::copy(&mut reader, &mut io::sink()).map_err(|e| classify(e, None))?;

        bundle.check_tree(&dirs)?;
        Ok(bundle)
    }

    /// Builds a bundle from `(path, entry)` pairs, with the same path rules as
    /// [`Bundle::from_tar_gz`]. Useful to construct bundles in memory.
    pub fn from_entries<I>(entries: I) -> Result<Bundle, BundleError>
    where
        I: IntoIterator<Item = (String, Entry)>,
    {
        let mut bundle = Bundle::default();
        for (raw, entry) in entries {
            let Some(path) = normalize_path(raw.as_bytes())? else {
                return Err(BundleError::UnsafePath {
                    path: raw,
                    reason: "expected a path below the workspace root, found the root itself"
                        .into(),
                });
            };
            bundle.insert(&path, entry)?;
        }
        bundle.check_tree(&BTreeSet::new())?;
        Ok(bundle)
    }

    /// Adds one entry under an already canonical path. Tree-wide rules
    /// (conflicts, symlink escapes) are checked once at the end by
    /// [`Bundle::check_tree`], because they depend on entries not seen yet.
    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), BundleError> {
        if path.len() > MAX_PATH_BYTES {
            return Err(BundleError::UnsafePath {
                path: path.to_owned(),
                reason: format!(
                    "expected at most {MAX_PATH_BYTES} bytes, found {}",
                    path.len()
                ),
            });
        }
        let entry = match entry {
            Entry::Symlink { target } => Entry::Symlink {
                target: normalize_target(path, &target)?,
            },
            file => file,
        };
        if self.files.insert(path.to_owned(), entry).is_some() {
            return Err(BundleError::DuplicatePath {
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    /// Checks the rules that span entries: nothing lies below a file or
    /// symlink (nor below a path an archive declared a directory *and* stored
    /// as a file), and no symlink escapes the root.
    fn check_tree(&self, dirs: &BTreeSet<String>) -> Result<(), BundleError> {
        for dir in dirs {
            if self.files.contains_key(dir) {
                return Err(BundleError::DuplicatePath { path: dir.clone() });
            }
        }
        for path in self.files.keys() {
            // Keys sort bytewise, so every key starting with "path/" follows
            // "path/" directly; one range probe finds a child if there is one.
            let child_prefix = format!("{path}/");
            if let Some((child, _)) = self.files.range(child_prefix.clone()..).next() {
                if child.starts_with(&child_prefix) {
                    return Err(BundleError::PathConflict {
                        path: child.clone(),
                        other: path.clone(),
                    });
                }
            }
        }
        let mut budget = SYMLINK_STEP_BUDGET;
        for (path, entry) in &self.files {
            let Entry::Symlink { target } = entry else {
                continue;
            };
            // A target without `..` only descends: it can leave the root only
            // through another symlink that itself climbs out, and that one is
            // checked in its own right. Only climbing targets need resolving.
            if target.split('/').any(|c| c == "..") {
                self.check_symlink(path, target, &mut budget)
                    .map_err(|reason| BundleError::UnsafePath {
                        path: path.clone(),
                        reason,
                    })?;
            }
        }
        Ok(())
    }

    /// Resolves `target` from the directory of the link at `link` the way the
    /// kernel would and fails if the walk ever climbs above the root.
    fn check_symlink(&self, link: &str, target: &str, budget: &mut usize) -> Result<(), String> {
        let mut start: Vec<&str> = link.split('/').collect();
        start.pop();
        match self.resolve(start, target, budget) {
            Ok(_) => Ok(()),
            Err(Walk::Escapes) => Err(format!(
                "expected a symlink target inside the workspace, found '{target}', which resolves outside it"
            )),
            Err(Walk::Loop) => Err(format!(
                "expected a symlink target that resolves, found '{target}', which passes through more than {MAX_SYMLINK_HOPS} symlinks"
            )),
            Err(Walk::OverBudget) => {
                Err("symlinks of this bundle are too deeply chained to verify".to_owned())
            }
        }
    }

    /// Walks `rel` from the directory `start` (components from the root),
    /// substituting the bundle's symlinks wherever they are met, including
    /// the last component. Returns the components of the final path, which
    /// is not a symlink (it may be a file, a directory or nothing).
    fn resolve<'a>(
        &'a self,
        start: Vec<&'a str>,
        rel: &'a str,
        budget: &mut usize,
    ) -> Result<Vec<&'a str>, Walk> {
        let mut stack = start;
        let mut pending: Vec<&str> = rel.split('/').rev().collect();
        let mut hops = 0usize;
        while let Some(component) = pending.pop() {
            *budget = budget.checked_sub(1).ok_or(Walk::OverBudget)?;
            match component {
                "" | "." => {}
                ".." => {
                    stack.pop().ok_or(Walk::Escapes)?;
                }
                name => {
                    stack.push(name);
                    if let Some(Entry::Symlink { target }) =
                        self.files.get(stack.join("/").as_str())
                    {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(Walk::Loop);
                        }
                        stack.pop();
                        pending.extend(target.split('/').rev());
                    }
                }
            }
        }
        Ok(stack)
    }

    /// The archive in canonical form: entries sorted by path, no directory
    /// entries, mtime 0, uid/gid 0, empty owner names, mode 0644/0755 for
    /// files and 0777 for symlinks, GNU long-name records for paths over 100
    /// bytes, gzip at a fixed level with a zero mtime in its header.
    pub fn to_tar_gz(&self) -> Vec<u8> {
        let encoder = GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(Vec::new(), Compression::new(GZIP_LEVEL));
        let result = self
            .write_tar(None, false, encoder)
            .and_then(|encoder| encoder.finish());
        match result {
            Ok(bytes) => bytes,
            // Every write goes to a Vec, and paths were validated when the
            // bundle was built, so no error is possible here.
            Err(err) => unreachable!("writing a bundle into memory failed: {err}"),
        }
    }

    /// `"sha256:<64 hex>"` of the canonical *uncompressed* tar stream, so the
    /// digest depends on the content only, not on the compressor or on how the
    /// input archive was produced.
    pub fn digest(&self) -> String {
        let result = self.write_tar(None, false, HashWriter(Sha256::new()));
        match result {
            Ok(HashWriter(hasher)) => format!("sha256:{}", hex::encode(hasher.finalize())),
            Err(err) => unreachable!("hashing a bundle failed: {err}"),
        }
    }

    /// All entries, sorted by path.
    pub fn files(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.files
            .iter()
            .map(|(path, entry)| (path.as_str(), entry))
    }

    /// The entry stored at exactly `path`, without following symlinks.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.files.get(path)
    }

    /// The content of the regular file at `path`, following symlinks of the
    /// bundle (as opening the path on disk would). `None` if there is no such
    /// file, or the path is a dangling or looping symlink.
    pub fn read(&self, path: &str) -> Option<&[u8]> {
        let mut budget = SYMLINK_STEP_BUDGET;
        let resolved = self.resolve(Vec::new(), path, &mut budget).ok()?;
        match self.files.get(resolved.join("/").as_str())? {
            Entry::File { data, .. } => Some(data),
            Entry::Symlink { .. } => None,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the bundle has no entries at all.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Sum of the sizes of all regular files.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .values()
            .map(|entry| match entry {
                Entry::File { data, .. } => data.len() as u64,
                Entry::Symlink { .. } => 0,
            })
            .sum()
    }

    /// Writes an uncompressed tar of all entries under `prefix/` (for example
    /// `workspace`), with a directory entry (mode 0755) for the prefix, each of
    /// its parents and every directory of the bundle, parents first. This is
    /// the form Docker's archive upload expects. An empty prefix puts the
    /// entries at the archive root.
    pub fn write_tar_with_prefix<W: Write>(&self, prefix: &str, w: W) -> io::Result<()> {
        let trimmed = prefix.trim_matches('/');
        if trimmed
            .split('/')
            .any(|c| c == ".." || c == "." || (c.is_empty() && !trimmed.is_empty()))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "expected a relative directory prefix such as 'workspace', found '{prefix}'"
                ),
            ));
        }
        self.write_tar(Some(trimmed), true, w).map(|_| ())
    }

    fn write_tar<W: Write>(
        &self,
        prefix: Option<&str>,
        with_dirs: bool,
        mut w: W,
    ) -> io::Result<W> {
        let prefixed = |path: &str| match prefix {
            Some(p) if !p.is_empty() => format!("{p}/{path}"),
            _ => path.to_owned(),
        };
        let mut items: BTreeMap<String, Option<&Entry>> = BTreeMap::new();
        if with_dirs {
            // Listing the prefix itself covers an empty bundle; the parents of
            // every prefixed path cover the prefix's parents and all
            // directories of the bundle.
            if let Some(p) = prefix.filter(|p| !p.is_empty()) {
                items.insert(p.to_owned(), None);
                for parent in parents(p) {
                    items.insert(parent.to_owned(), None);
                }
            }
            for path in self.files.keys() {
                let full = prefixed(path);
                for parent in parents(&full) {
                    items.insert(parent.to_owned(), None);
                }
            }
        }
        for (path, entry) in &self.files {
            items.insert(prefixed(path), Some(entry));
        }
        for (path, entry) in &items {
            match entry {
                None => write_entry(&mut w, &format!("{path}/"), b'5', 0o755, &[], None)?,
                Some(Entry::File { data, executable }) => {
                    let mode = if *executable { 0o755 } else { 0o644 };
                    write_entry(&mut w, path, b'0', mode, data, None)?;
                }
                Some(Entry::Symlink { target }) => {
                    write_entry(&mut w, path, b'2', 0o777, &[], Some(target))?
                }
            }
        }
        w.write_all(&[0u8; 2 * BLOCK])?;
        Ok(w)
    }

    /// Writes the bundle below `dir`, which must exist and should be empty:
    /// existing files are never overwritten (that is an error), so content of
    /// another run cannot be mixed in or followed through a planted symlink.
    /// Files get mode 0755 or 0644 regardless of the umask.
    pub fn unpack_into(&self, dir: &Path) -> Result<(), BundleError> {
        let meta = fs::metadata(dir).map_err(|source| BundleError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(BundleError::Io {
                path: dir.display().to_string(),
                source: io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "expected a directory to unpack into, found a file",
                ),
            });
        }
        for (path, entry) in &self.files {
            let dest = dir.join(path);
            let io_err = |source| BundleError::Io {
                path: dest.display().to_string(),
                source,
            };
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err)?;
            }
            match entry {
                Entry::File { data, executable } => {
                    write_new_file(&dest, data, *executable).map_err(io_err)?
                }
                Entry::Symlink { target } => create_symlink(target, &dest).map_err(io_err)?,
            }
        }
        Ok(())
    }
}

/// Counts decompressed bytes and fails once `limit` is passed, remembering
/// why in cells the caller can inspect after the tar reader wrapped the error.
struct LimitedReader<'a, R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: &'a Cell<bool>,
    gzip_error: &'a Cell<Option<String>>,
}

impl<R: Read> Read for LimitedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Never ask for more than one byte past the limit, so a bomb is not
        // inflated further than needed to notice it.
        let allowed = self.limit.saturating_sub(self.read).saturating_add(1);
        let len = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..len]) {
            Ok(n) => n,
            Err(err) => {
                self.gzip_error.set(Some(err.to_string()));
                return Err(err);
            }
        };
        self.read += n as u64;
        if self.read > self.limit {
            self.exceeded.set(true);
            return Err(io::Error::other("unpacked size limit exceeded"));
        }
        Ok(n)
    }
}

/// Why a walk through the bundle's paths stopped.
enum Walk {
    Escapes,
    Loop,
    OverBudget,
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one tar record: GNU long-name/long-link records first when the
/// path or target does not fit the 100-byte header fields, then the header
/// and the data padded to a whole block.
fn write_entry<W: Write>(
    w: &mut W,
    path: &str,
    kind: u8,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    set_name_field(w, &mut header, path.as_bytes(), b'L', NameField::Name)?;
    if let Some(link) = link {
        set_name_field(w, &mut header, link.as_bytes(), b'K', NameField::Link)?;
    }
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    header.set_entry_type(tar::EntryType::new(kind));
    header.set_cksum();
    w.write_all(header.as_bytes())?;
    w.write_all(data)?;
    write_padding(w, data.len())
}

#[derive(Clone, Copy)]
enum NameField {
    Name,
    Link,
}

fn set_name_field<W: Write>(
    w: &mut W,
    header: &mut tar::Header,
    value: &[u8],
    long_kind: u8,
    field: NameField,
) -> io::Result<()> {
    let old = header.as_old_mut();
    let slot = match field {
        NameField::Name => &mut old.name,
        NameField::Link => &mut old.linkname,
    };
    if value.len() > slot.len() {
        // GNU tar's convention: a `././@LongLink` record carrying the full
        // name with a trailing NUL, and the truncated name in the header.
        let mut long = tar::Header::new_gnu();
        let name = b"././@LongLink";
        long.as_old_mut().name[..name.len()].copy_from_slice(name);
        long.set_mode(0o644);
        long.set_uid(0);
        long.set_gid(0);
        long.set_mtime(0);
        long.set_size(value.len() as u64 + 1);
        long.set_entry_type(tar::EntryType::new(long_kind));
        long.set_cksum();
        w.write_all(long.as_bytes())?;
        w.write_all(value)?;
        w.write_all(&[0])?;
        write_padding(w, value.len() + 1)?;
    }
    let n = value.len().min(slot.len());
    slot[..n].copy_from_slice(&value[..n]);
    Ok(())
}

fn write_padding<W: Write>(w: &mut W, len: usize) -> io::Result<()> {
    let rem = len % BLOCK;
    if rem != 0 {
        w.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

/// Turns an archive path into a canonical bundle path: drops `.` and empty
/// components (so `./a//b/` is `a/b`), rejects absolute paths, `..`, NUL and
/// non-UTF-8 bytes. `None` means the path names the root itself (`./`).
fn normalize_path(raw: &[u8]) -> Result<Option<String>, BundleError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = |reason: &str| BundleError::UnsafePath {
        path: shown(),
        reason: reason.into(),
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err(unsafe_path("expected a UTF-8 path"));
    };
    if text.starts_with('/') {
        return Err(unsafe_path(
            "expected a relative path, found an absolute one",
        ));
    }
    if text.contains('\0') {
        return Err(unsafe_path("expected a path without NUL bytes"));
    }
    let mut parts = Vec::new();
    for component in text.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                return Err(unsafe_path(
                    "expected a path inside the workspace, found a '..' component",
                ))
            }
            name => parts.push(name),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(parts.join("/")))
}

/// Canonical form of a symlink target: relative, no empty or `.` components
/// (`a//./b/` is `a/b`, `./` is `.`), at most [`MAX_PATH_BYTES`] bytes.
fn normalize_target(link: &str, target: &str) -> Result<String, BundleError> {
    let unsafe_path = |reason: String| BundleError::UnsafePath {
        path: link.to_owned(),
        reason,
    };
    if target.is_empty() {
        return Err(unsafe_path(
            "expected a symlink target, found an empty one".into(),
        ));
    }
    if target.starts_with('/') {
        return Err(unsafe_path(format!(
            "expected a relative symlink target inside the workspace, found the absolute target '{target}'"
        )));
    }
    if target.contains('\0') {
        return Err(unsafe_path(
            "expected a symlink target without NUL bytes".into(),
        ));
    }
    if target.len() > MAX_PATH_BYTES {
        return Err(unsafe_path(format!(
            "expected a symlink target of at most {MAX_PATH_BYTES} bytes, found {}",
            target.len()
        )));
    }
    let parts: Vec<&str> = target
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() {
        return Ok(".".into());
    }
    Ok(parts.join("/"))
}

/// The proper ancestors of a canonical path: `a/b/c` gives `a`, `a/b`.
fn parents(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{rel}/{name}")
    }
}

fn entry_kind_name(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Link => "a hard link".into(),
        tar::EntryType::Char => "a character device".into(),
        tar::EntryType::Block => "a block device".into(),
        tar::EntryType::Fifo => "a fifo".into(),
        tar::EntryType::GNUSparse => "a sparse file".into(),
        other => format!("tar entry type '{}'", other.as_byte().escape_ascii()),
    }
}

#[cfg(unix)]
fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &fs::Metadata) -> bool {
    false
}

#[cfg(unix)]
fn special_file_kind(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "a fifo"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "a special file"
    }
}

#[cfg(not(unix))]
fn special_file_kind(_file_type: &fs::FileType) -> &'static str {
    "a special file"
}

#[cfg(unix)]
fn write_new_file(dest: &Path, data: &[u8], executable: bool) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = if executable { 0o755 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dest)?;
    file.write_all(data)?;
    // The mode passed to open is filtered by the umask; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn write_new_file(dest: &Path, data: &[u8], _executable: bool) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)?;
    file.write_all(data)
}

#[cfg(unix)]
fn create_symlink(target: &str, dest: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, dest)
}

#[cfg(not(unix))]
fn create_symlink(_target: &str, _dest: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "unpacking symlinks needs a unix system",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &str) -> Entry {
        Entry::File {
            data: data.as_bytes().to_vec(),
            executable: false,
        }
    }

    fn link(target: &str) -> Entry {
        Entry::Symlink {
            target: target.into(),
        }
    }

    fn bundle(entries: &[(&str, Entry)]) -> Result<Bundle, BundleError> {
        Bundle::from_entries(entries.iter().map(|(p, e)| (p.to_string(), e.clone())))
    }

    #[test]
    fn paths_are_normalised_or_rejected() {
        assert_eq!(
            normalize_path(b"./a//b/./c/").unwrap().as_deref(),
            Some("a/b/c")
        );
        assert_eq!(normalize_path(b"./").unwrap(), None);
        assert_eq!(normalize_path(b".").unwrap(), None);
        for bad in [&b"/etc/passwd"[..], b"a/../../b", b"..", b"a/\xff", b"a\0b"] {
            let err = normalize_path(bad).unwrap_err();
            assert!(matches!(err, BundleError::UnsafePath { .. }), "{err}");
        }
    }

    #[test]
    fn symlink_targets_are_normalised() {
        assert_eq!(normalize_target("l", "./a//./b/").unwrap(), "a/b");
        assert_eq!(normalize_target("l", "./").unwrap(), ".");
        assert_eq!(normalize_target("l", "../x").unwrap(), "../x");
        assert!(normalize_target("l", "").is_err());
        assert!(normalize_target("l", "/etc").is_err());
    }

    #[test]
    fn symlinks_inside_the_root_are_kept() {
        let b = bundle(&[
            ("sub/file", file("x")),
            ("sub/up", link("..")),
            ("sub/sibling", link("../top")),
            ("top", file("t")),
            ("through", link("sub/up/sub/file")),
            ("dangling", link("missing/dir")),
        ])
        .unwrap();
        assert_eq!(b.read("through"), Some(&b"x"[..]));
        assert_eq!(b.read("sub/sibling"), Some(&b"t"[..]));
        assert_eq!(b.read("dangling"), None);
    }

    #[test]
    fn symlinks_escaping_the_root_are_rejected_also_through_other_links() {
        let cases: &[&[(&str, Entry)]] = &[
            &[("x", link("../../etc"))],
            &[("a/b", link("../../outside"))],
            // Lexically `sub/up/..` is the root, but `sub/up` is the root
            // already, so `..` from it climbs out.
            &[
                ("sub/up", link("..")),
                ("sub/f", file("")),
                ("esc", link("sub/up/..")),
            ],
        ];
        for entries in cases {
            let err = bundle(entries).unwrap_err();
            let BundleError::UnsafePath { path, reason } = &err else {
                panic!("unexpected error {err}");
            };
            assert!(entries.iter().any(|(p, _)| p == path), "{err}");
            assert!(reason.contains("outside"), "{err}");
        }
    }

    #[test]
    fn symlink_loops_are_rejected() {
        let err = bundle(&[("a", link("b/..")), ("b", link("a/.."))]).unwrap_err();
        assert!(err.to_string().contains("more than 40 symlinks"), "{err}");
    }

    #[test]
    fn a_file_cannot_be_used_as_a_directory() {
        let err = bundle(&[("a", file("")), ("a/b", file(""))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "entry 'a/b' lies inside 'a', which is not a directory: expected 'a' to be a directory"
        );
        let err = bundle(&[("l", link("d")), ("d/x", file("")), ("l/x", file(""))]).unwrap_err();
        assert!(matches!(err, BundleError::PathConflict { .. }), "{err}");
        // Siblings that merely share a prefix are fine.
        bundle(&[("a", file("")), ("a-b/c", file("")), ("a.b", file(""))]).unwrap();
    }

    #[test]
    fn duplicate_paths_are_rejected_after_normalisation() {
        let err = bundle(&[("a/b", file("1")), ("./a//b", file("2"))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "entry 'a/b' appears more than once: expected each path once"
        );
    }

    #[test]
    fn canonical_archive_round_trips_long_names() {
        let long_dir = "d".repeat(120);
        let long_path = format!("{long_dir}/{}", "f".repeat(150));
        let long_target = format!("{long_dir}/{}", "f".repeat(150));
        let b = bundle(&[
            (&long_path, file("long")),
            ("link", link(&long_target)),
            (
                "run.sh",
                Entry::File {
                    data: b"#!/bin/sh\n".to_vec(),
                    executable: true,
                },
            ),
        ])
        .unwrap();
        let gz = b.to_tar_gz();
        let back = Bundle::from_tar_gz(&gz, &Limits::default()).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.digest(), b.digest());
        assert_eq!(gz, back.to_tar_gz(), "canonical output is byte-stable");
    }

    #[test]
    fn canonical_headers_carry_no_metadata() {
        let b = bundle(&[
            ("b.txt", file("b")),
            (
                "a.sh",
                Entry::File {
                    data: vec![],
                    executable: true,
                },
            ),
            ("c", link("b.txt")),
        ])
        .unwrap();
        let mut tar = Vec::new();
        b.write_tar(None, false, &mut tar).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(h.mtime().unwrap(), 0);
            assert_eq!(h.uid().unwrap(), 0);
            assert_eq!(h.gid().unwrap(), 0);
            assert_eq!(h.username().unwrap(), Some(""));
            assert_eq!(h.groupname().unwrap(), Some(""));
            seen.push((
                String::from_utf8(entry.path_bytes().into_owned()).unwrap(),
                h.mode().unwrap(),
            ));
        }
        assert_eq!(
            seen,
            vec![
                ("a.sh".into(), 0o755),
                ("b.txt".into(), 0o644),
                ("c".into(), 0o777)
            ]
        );
    }

    #[test]
    fn digest_has_the_documented_form_and_tracks_content() {
        let a = bundle(&[("f", file("1"))]).unwrap();
        let b = bundle(&[("f", file("2"))]).unwrap();
        let exec = bundle(&[(
            "f",
            Entry::File {
                data: b"1".to_vec(),
                executable: true,
            },
        )])
        .unwrap();
        let d = a.digest();
        assert!(d.starts_with("sha256:") && d.len() == 7 + 64, "{d}");
        assert_ne!(d, b.digest());
        assert_ne!(d, exec.digest());
        assert_eq!(d, a.clone().digest());
    }

    #[test]
    fn prefixed_tar_lists_parent_directories_first() {
        let b = bundle(&[
            ("blocks/x/block.poly", file("b")),
            ("workspace.poly", file("w")),
            (
                "blocks/x/run.sh",
                Entry::File {
                    data: vec![],
                    executable: true,
                },
            ),
        ])
        .unwrap();
        let mut tar = Vec::new();
        b.write_tar_with_prefix("srv/workspace", &mut tar).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let listing: Vec<(String, u32, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                    e.header().mode().unwrap(),
                    e.header().entry_type(),
                )
            })
            .collect();
        let names: Vec<&str> = listing.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "srv/",
                "srv/workspace/",
                "srv/workspace/blocks/",
                "srv/workspace/blocks/x/",
                "srv/workspace/blocks/x/block.poly",
                "srv/workspace/blocks/x/run.sh",
                "srv/workspace/workspace.poly",
            ]
        );
        assert!(listing
            .iter()
            .filter(|(_, _, t)| t.is_dir())
            .all(|(_, mode, _)| *mode == 0o755));
        assert!(b.write_tar_with_prefix("../x", Vec::new()).is_err());

        let mut plain = Vec::new();
        Bundle::default()
            .write_tar_with_prefix("workspace", &mut plain)
            .unwrap();
        let mut archive = tar::Archive::new(&plain[..]);
        assert_eq!(archive.entries().unwrap().count(), 1, "the prefix itself");
    }

    #[test]
    fn unpack_writes_files_modes_and_symlinks_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let b = bundle(&[
            ("a/b/c.txt", file("hello")),
            (
                "a/run.sh",
                Entry::File {
                    data: b"#!/bin/sh\n".to_vec(),
                    executable: true,
                },
            ),
            ("a/link", link("b/c.txt")),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        b.unpack_into(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("a/link")).unwrap(),
            "hello"
        );
        let mode = |p: &str| {
            fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("a/run.sh"), 0o755);
        assert_eq!(mode("a/b/c.txt"), 0o644);
        assert_eq!(
            fs::read_link(dir.path().join("a/link")).unwrap(),
            Path::new("b/c.txt")
        );
        assert_eq!(Bundle::from_dir(dir.path()).unwrap(), b);

        let err = b.unpack_into(dir.path()).unwrap_err();
        assert!(matches!(err, BundleError::Io { .. }), "{err}");
        assert!(b.unpack_into(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn from_dir_skips_vcs_and_logs_and_rejects_escapes_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join(".git/objects")).unwrap();
        fs::write(root.join(".git/HEAD"), "ref").unwrap();
        fs::create_dir_all(root.join(".logs/2024-01-01")).unwrap();
        fs::write(root.join(".logs/2024-01-01/tx.yml"), "log").unwrap();
        fs::create_dir_all(root.join("blocks/x/.logs")).unwrap();
        fs::write(root.join("blocks/x/.logs/kept"), "k").unwrap();
        fs::create_dir_all(root.join("empty/dir")).unwrap();
        fs::write(root.join("workspace.poly"), "name: x").unwrap();
        std::os::unix::fs::symlink("workspace.poly", root.join("alias.poly")).unwrap();
        let b = Bundle::from_dir(root).unwrap();
        let paths: Vec<&str> = b.files().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            ["alias.poly", "blocks/x/.logs/kept", "workspace.poly"]
        );
        assert_eq!(b.total_bytes(), 8);

        std::os::unix::fs::symlink("../../../etc/passwd", root.join("blocks/x/evil")).unwrap();
        let err = Bundle::from_dir(root).unwrap_err();
        assert!(err.to_string().contains("'blocks/x/evil'"), "{err}");
        fs::remove_file(root.join("blocks/x/evil")).unwrap();

        std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
        let err = Bundle::from_dir(root).unwrap_err();
        assert!(
            err.to_string().contains("'abs'") && err.to_string().contains("absolute"),
            "{err}"
        );
        fs::remove_file(root.join("abs")).unwrap();

        let status = std::process::Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status()
            .unwrap();
        assert!(status.success());
        let err = Bundle::from_dir(root).unwrap_err();
        assert_eq!(
            err.to_string(),
            "entry 'pipe': expected a regular file, a directory or a symlink, found a fifo"
        );
    }

    #[test]
    fn from_dir_needs_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "").unwrap();
        assert!(Bundle::from_dir(&dir.path().join("f")).is_err());
        assert!(Bundle::from_dir(&dir.path().join("missing")).is_err());
    }
}
