//! The Polycrate workspace model: parsing `workspace.poly` and
//! `blocks/**/block.poly` out of a [`Bundle`], validating them, resolving
//! `from:` inheritance and merging block configuration.
//!
//! [`load`] turns a bundle into a [`LoadedWorkspace`]: the workspace as written
//! plus one [`ResolvedBlock`] per runnable block, with its configuration merged
//! (parent block < block.poly < workspace.poly instance), its actions and its
//! inventory. Everything a run needs later is in that value, so the
//! coordinator stores it as JSON and the runner never parses YAML.
//!
//! The files are outside input written by people, so every problem is reported
//! as `file:line: key: what was expected, what was found`. YAML is first read
//! into a generic tree (syntax errors carry the parser's line and column); the
//! tree is then checked by hand, and the line of an offending key is found by
//! walking the text once more with the YAML parser itself (see [`locate`]), so
//! line numbers stay right for flow style, comments and multi-line strings.
//!
//! Decisions beyond the Polycrate reference:
//! - A block.poly that inherits (`from:`) from a block in another directory
//!   keeps its own directory; the playbook paths of actions it inherits are
//!   rewritten relative to it (`../base/patch.yml`), so they still find their
//!   files.
//! - A playbook must exist in the bundle when the workspace is loaded, so a
//!   typo fails at push time instead of at run time.
//! - Registry blocks (`from: host.tld/path/name:1.2.3`) must be pinned to a
//!   SemVer tag or a digest and must be vendored under `blocks/` (as
//!   `polycrate blocks pull` leaves them); Muster does not pull blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::OnceLock;

use regex::Regex;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value as Json};
use serde_yaml_ng::{Mapping, Value as Yaml};

use crate::bundle::Bundle;

/// The workspace definition file at the bundle root.
pub const WORKSPACE_FILE: &str = "workspace.poly";
/// The file that defines a block; its directory is the block's directory.
pub const BLOCK_FILE: &str = "block.poly";
/// The workspace-wide Ansible inventory at the bundle root.
pub const INVENTORY_FILE: &str = "inventory.yml";
/// Where block definitions live.
pub const BLOCKS_DIR: &str = "blocks";
/// Polycrate's rule for workspace, organization, block and action names.
pub const NAME_PATTERN: &str = r"^[a-zA-Z]+([-/_]?[a-zA-Z0-9_]+)+$";

/// The SemVer 2.0.0 grammar (semver.org's regular expression, ASCII digits).
const SEMVER_PATTERN: &str = r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$";

const ENV_NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";

/// A parsed, validated workspace with its blocks resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadedWorkspace {
    pub workspace: Workspace,
    /// Every runnable block by name: the instances of `workspace.poly` plus
    /// block definitions no instance refers to.
    pub blocks: BTreeMap<String, ResolvedBlock>,
}

impl LoadedWorkspace {
    /// The resolved block called `name`.
    pub fn block(&self, name: &str) -> Option<&ResolvedBlock> {
        self.blocks.get(name)
    }
}

/// `workspace.poly` as written. Keys this model does not know are kept in
/// `extra`, because Polycrate grows keys faster than we track them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workspace {
    pub name: String,
    pub organization: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub blocks: Vec<BlockInstance>,
    #[serde(default)]
    pub workflows: Vec<Workflow>,
    #[serde(default)]
    pub config: WorkspaceConfig,
    #[serde(default)]
    pub extraenv: Vec<String>,
    #[serde(default)]
    pub extramounts: Vec<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// `workspace.poly` `config:`, the toolchain settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageConfig>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// The container image actions run in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// One entry of `workspace.poly` `blocks:`: a named use of a block
/// definition with its own configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockInstance {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Always a JSON object.
    #[serde(default = "empty_object")]
    pub config: Json,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// A named sequence of block actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    pub name: String,
    #[serde(default)]
    pub allow_failure: bool,
    #[serde(default)]
    pub steps: Vec<WorkflowStep>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// One step of a workflow; `block` and `action` are checked to exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowStep {
    pub name: String,
    pub block: String,
    pub action: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// A `block.poly` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockDef {
    pub name: String,
    /// SemVer, validated when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Defaults; always a JSON object.
    #[serde(default = "empty_object")]
    pub config: Json,
    #[serde(default)]
    pub actions: Vec<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// An action of a block. In JSON the kind is flattened, so an action reads
/// as in the `.poly` file: `{"name": "patch", "playbook": "patch.yml"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Longest the action may run, in seconds, once started; the runner
    /// stops it after that and the run ends `timed_out`. `None` is no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// How many more times a run of this action is attempted when its
    /// runner is lost (0 to 10). `None`: never; ops jobs are not idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    // Declared before `extra` so it claims its key first when deserializing.
    #[serde(flatten)]
    pub kind: ActionKind,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Json>,
}

/// What an action runs: exactly one of `playbook:` or `script:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// A playbook path relative to the directory of the block it belongs to
    /// (for a [`ResolvedBlock`], relative to its `dir`).
    Playbook(String),
    /// Shell lines, run in order.
    Script(Vec<String>),
}

/// A block ready to run: definition, inheritance and instance merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedBlock {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Bundle-relative directory of the block whose files are used, e.g.
    /// `blocks/linux-patch`; actions run there.
    pub dir: String,
    /// Merged configuration; always a JSON object.
    pub config: Json,
    pub actions: Vec<Action>,
    /// Bundle-relative inventory: `artifacts/blocks/<block>/inventory.yml` if
    /// present, else the root `inventory.yml` if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<String>,
    /// For an instance: the block it was made from (its `from:`, or its own
    /// name when `from:` is omitted). For a bare definition: its parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl ResolvedBlock {
    /// The action called `name`.
    pub fn action(&self, name: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.name == name)
    }
}

/// Why a workspace could not be loaded. Every variant about a file names the
/// file and the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace.poly is missing: expected it at the root of the workspace")]
    MissingWorkspace,
    #[error("{file}: expected UTF-8 text, found invalid bytes")]
    NotUtf8 { file: String },
    #[error("{file}:{line}:{column}: invalid YAML: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}: {}{message}", key_prefix(.key))]
    Invalid {
        file: String,
        line: usize,
        /// Path of the offending key, e.g. `actions[0].playbook`; empty for
        /// the document itself.
        key: String,
        message: String,
    },
    #[error(
        "{file}:{line}: {key}: registry block '{reference}' is not vendored in the workspace: expected its block.poly under {expected}; Muster does not pull blocks, so pull it with `polycrate blocks pull {reference}` and add it to the workspace"
    )]
    RegistryBlockNotVendored {
        file: String,
        line: usize,
        key: String,
        reference: String,
        expected: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

/// Parses and resolves the workspace in `bundle`.
pub fn load(bundle: &Bundle) -> Result<LoadedWorkspace, WorkspaceError> {
    let ws_text = text_of(bundle, WORKSPACE_FILE)?.ok_or(WorkspaceError::MissingWorkspace)?;
    let ws_doc = Doc {
        file: WORKSPACE_FILE,
        text: &ws_text,
    };
    let ws_yaml = ws_doc.parse()?;
    let workspace = parse_workspace_value(&ws_doc, &ws_yaml)?;

    let mut sources = Vec::new();
    for (path, _) in bundle.files() {
        if is_block_file(path) {
            if let Some(text) = text_of(bundle, path)? {
                let dir = path
                    .strip_suffix(BLOCK_FILE)
                    .map(|d| d.trim_end_matches('/'))
                    .unwrap_or(BLOCKS_DIR)
                    .to_owned();
                sources.push((path.to_owned(), dir, text));
            }
        }
    }
    let mut defs = Vec::new();
    for (file, dir, text) in &sources {
        let doc = Doc { file, text };
        let value = doc.parse()?;
        let def = parse_block_value(&doc, &value)?;
        check_playbooks(&doc, &def, dir, bundle)?;
        defs.push(DefSource {
            def,
            doc,
            dir: dir.clone(),
        });
    }

    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for (idx, source) in defs.iter().enumerate() {
        if let Some(first) = by_name.insert(&source.def.name, idx) {
            return Err(source.doc.invalid(
                &[key("name")],
                format!(
                    "expected each block name to be defined once, found '{}' also defined in {}",
                    source.def.name, defs[first].doc.file
                ),
            ));
        }
    }

    let resolver = Resolver {
        defs: &defs,
        by_name,
        cache: BTreeMap::new(),
    };
    resolve_all(resolver, workspace, &ws_doc, bundle)
}

/// Parses `workspace.poly` text on its own (without blocks), e.g. for a
/// quick validation.
pub fn parse_workspace(text: &str) -> Result<Workspace, WorkspaceError> {
    let doc = Doc {
        file: WORKSPACE_FILE,
        text,
    };
    let value = doc.parse()?;
    parse_workspace_value(&doc, &value)
}

/// Parses one `block.poly` on its own; `file` is the name used in errors.
/// Playbook files are not checked here (there is no bundle to look in).
pub fn parse_block(file: &str, text: &str) -> Result<BlockDef, WorkspaceError> {
    let doc = Doc { file, text };
    let value = doc.parse()?;
    parse_block_value(&doc, &value)
}

/// Whether `name` follows Polycrate's naming rule ([`NAME_PATTERN`]).
pub fn is_valid_name(name: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| compile(NAME_PATTERN)).is_match(name)
}

/// Whether `version` is a SemVer 2.0.0 version such as `1.2.3-rc.1`.
pub fn is_semver(version: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| compile(SEMVER_PATTERN)).is_match(version)
}

fn is_env_name(name: &str) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| compile(ENV_NAME_PATTERN)).is_match(name)
}

fn compile(pattern: &str) -> Regex {
    match Regex::new(pattern) {
        Ok(re) => re,
        // The patterns are constants of this module and covered by tests.
        Err(err) => unreachable!("invalid built-in pattern {pattern}: {err}"),
    }
}

fn empty_object() -> Json {
    Json::Object(Map::new())
}

fn is_block_file(path: &str) -> bool {
    path.strip_prefix("blocks/")
        .is_some_and(|rest| rest == BLOCK_FILE || rest.ends_with("/block.poly"))
}

fn text_of(bundle: &Bundle, path: &str) -> Result<Option<String>, WorkspaceError> {
    match bundle.read(path) {
        None => Ok(None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Ok(Some(text.to_owned())),
            Err(_) => Err(WorkspaceError::NotUtf8 {
                file: path.to_owned(),
            }),
        },
    }
}

// ---------------------------------------------------------------------------
// Documents, key paths and locating keys
// ---------------------------------------------------------------------------

/// One step of a key path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn key(name: &str) -> Seg {
    Seg::Key(name.to_owned())
}

fn extend(path: &[Seg], seg: Seg) -> Vec<Seg> {
    let mut out = path.to_vec();
    out.push(seg);
    out
}

/// `actions[0].playbook` style.
fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A `.poly` file being checked: its name for messages and its text for
/// finding lines.
struct Doc<'a> {
    file: &'a str,
    text: &'a str,
}

impl Doc<'_> {
    fn parse(&self) -> Result<Yaml, WorkspaceError> {
        let mut value: Yaml = serde_yaml_ng::from_str(self.text).map_err(|err| {
            let (line, column) = err
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            WorkspaceError::Syntax {
                file: self.file.to_owned(),
                line,
                column,
                message: strip_location(&err.to_string()),
            }
        })?;
        // `<<: *defaults` merge keys are YAML 1.1 but common in Ansible-land,
        // and Polycrate's Go parser honours them.
        value.apply_merge().map_err(|err| WorkspaceError::Invalid {
            file: self.file.to_owned(),
            line: self
                .text
                .lines()
                .position(|l| l.trim_start().starts_with("<<"))
                .map_or(1, |i| i + 1),
            key: "<<".into(),
            message: format!("expected a mapping or a list of mappings to merge: {err}"),
        })?;
        Ok(value)
    }

    fn invalid(&self, path: &[Seg], message: impl Into<String>) -> WorkspaceError {
        WorkspaceError::Invalid {
            file: self.file.to_owned(),
            line: locate(self.text, path),
            key: path_string(path),
            message: message.into(),
        }
    }
}

/// Drops the parser's own " at line L column C" (the error repeats it as
/// `file:line:column`).
fn strip_location(message: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| compile(r" at line [0-9]+ column [0-9]+"));
    re.replace(message, "").into_owned()
}

/// The 1-based line of the key (or list item) at `path` in `text`, or of its
/// nearest ancestor that can be found (a missing key reports the mapping that
/// should hold it), or 1.
fn locate(text: &str, path: &[Seg]) -> usize {
    (0..=path.len())
        .rev()
        .find_map(|len| locate_exact(text, &path[..len]))
        .unwrap_or(1)
}

/// A sentinel that cannot occur in YAML text (it holds a NUL), put into the
/// error raised when the walk reaches its target.
const FOUND: &str = "\u{0}muster-locate-found";

/// Walks `text` with the YAML deserializer down `path` and fails on purpose
/// at the target node: the deserializer stamps its error with the position of
/// the node being read, which is exactly the line we want. Other errors
/// (path not present, type mismatch) mean "not found".
fn locate_exact(text: &str, path: &[Seg]) -> Option<usize> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    match (Locator { path }).deserialize(deserializer) {
        Err(err) if err.to_string().contains(FOUND) => err.location().map(|l| l.line()),
        _ => None,
    }
}

struct Locator<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Locator<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => deserializer.deserialize_any(Found),
            Some((Seg::Key(key), rest)) => deserializer.deserialize_map(MapLocator { key, rest }),
            Some((Seg::Index(index), rest)) => deserializer.deserialize_seq(SeqLocator {
                index: *index,
                rest,
            }),
        }
    }
}

/// Rejects whatever it is given: every default `visit_*` fails with a message
/// that includes `expecting`, i.e. the sentinel.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(FOUND)
    }
}

struct MapLocator<'p> {
    key: &'p str,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for MapLocator<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let matcher = KeyMatcher {
            key: self.key,
            is_target: self.rest.is_empty(),
        };
        while let Some(matched) = map.next_key_seed(matcher)? {
            if matched {
                return map.next_value_seed(Locator { path: self.rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Compares a mapping key with the wanted one; when the key itself is the
/// target, fails on it so the error carries the key's position.
#[derive(Clone, Copy)]
struct KeyMatcher<'p> {
    key: &'p str,
    is_target: bool,
}

impl KeyMatcher<'_> {
    fn check<E: de::Error>(self, found: &str) -> Result<bool, E> {
        match (found == self.key, self.is_target) {
            (true, true) => Err(E::custom(FOUND)),
            (matched, _) => Ok(matched),
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeyMatcher<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyMatcher<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a scalar key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&v.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

struct SeqLocator<'p> {
    index: usize,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for SeqLocator<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Locator { path: self.rest })?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Reading values
// ---------------------------------------------------------------------------

/// How a YAML value reads in a message: "a list", "the number 3".
fn describe(value: &Yaml) -> String {
    match value {
        Yaml::Null => "nothing".into(),
        Yaml::Bool(b) => format!("the boolean {b}"),
        Yaml::Number(n) => format!("the number {n}"),
        Yaml::String(s) if s.is_empty() => "an empty string".into(),
        Yaml::String(s) => format!("'{}'", shorten(s)),
        Yaml::Sequence(_) => "a list".into(),
        Yaml::Mapping(_) => "a mapping".into(),
        Yaml::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(MAX).collect::<String>())
    }
}

/// A key as text: strings as they are, numbers and booleans in their YAML
/// spelling (Go's YAML decoder does the same for `map[string]...`).
fn key_text(key: &Yaml) -> Option<String> {
    match key {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Converts a YAML tree to JSON. Tags are dropped (their value is kept);
/// non-finite floats and non-scalar keys have no JSON form and are errors.
fn to_json(doc: &Doc, value: &Yaml, path: &[Seg]) -> Result<Json, WorkspaceError> {
    Ok(match value {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::from(i)
            } else if let Some(u) = n.as_u64() {
                Json::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match serde_json::Number::from_f64(f) {
                    Some(num) => Json::Number(num),
                    None => {
                        return Err(
                            doc.invalid(path, format!("expected a finite number, found {n}"))
                        )
                    }
                }
            }
        }
        Yaml::String(s) => Json::String(s.clone()),
        Yaml::Sequence(items) => Json::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| to_json(doc, item, &extend(path, Seg::Index(i))))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Mapping(map) => Json::Object(mapping_to_json(doc, map, path)?),
        Yaml::Tagged(tagged) => to_json(doc, &tagged.value, path)?,
    })
}

fn mapping_to_json(
    doc: &Doc,
    map: &Mapping,
    path: &[Seg],
) -> Result<Map<String, Json>, WorkspaceError> {
    let mut out = Map::new();
    for (k, v) in map {
        let Some(name) = key_text(k) else {
            return Err(doc.invalid(
                path,
                format!("expected string keys, found {} as a key", describe(k)),
            ));
        };
        let child = extend(path, Seg::Key(name.clone()));
        let value = to_json(doc, v, &child)?;
        if out.insert(name.clone(), value).is_some() {
            return Err(doc.invalid(
                &child,
                format!("expected each key once, found '{name}' twice (once unquoted)"),
            ));
        }
    }
    Ok(out)
}

/// A mapping being read, with the path that leads to it.
struct Obj<'d, 'v> {
    doc: &'d Doc<'d>,
    map: &'v Mapping,
    path: Vec<Seg>,
}

impl<'d, 'v> Obj<'d, 'v> {
    fn new(
        doc: &'d Doc<'d>,
        value: &'v Yaml,
        path: Vec<Seg>,
        what: &str,
    ) -> Result<Self, WorkspaceError> {
        match value {
            Yaml::Mapping(map) => Ok(Obj { doc, map, path }),
            Yaml::Tagged(tagged) => Obj::new(doc, &tagged.value, path, what),
            other => Err(doc.invalid(&path, format!("expected {what}, found {}", describe(other)))),
        }
    }

    fn at(&self, name: &str) -> Vec<Seg> {
        extend(&self.path, key(name))
    }

    fn invalid(&self, name: &str, message: impl Into<String>) -> WorkspaceError {
        self.doc.invalid(&self.at(name), message)
    }

    /// The value of `name`; an explicit `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'v Yaml> {
        match self.map.get(name) {
            None | Some(Yaml::Null) => None,
            Some(Yaml::Tagged(tagged)) if tagged.value == Yaml::Null => None,
            Some(Yaml::Tagged(tagged)) => Some(&tagged.value),
            Some(value) => Some(value),
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>, WorkspaceError> {
        match self.get(name) {
            None => Ok(None),
            Some(Yaml::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.invalid(
                name,
                format!(
                    "expected a string, found {}{}",
                    describe(other),
                    quote_hint(other)
                ),
            )),
        }
    }

    fn required_string(&self, name: &str, what: &str) -> Result<String, WorkspaceError> {
        self.string(name)?.ok_or_else(|| {
            self.invalid(
                name,
                format!("expected {what}, found nothing (the key is required)"),
            )
        })
    }

    fn required_name(&self, name: &str) -> Result<String, WorkspaceError> {
        let value = self.required_string(name, "a name")?;
        self.check_name(name, &value)?;
        Ok(value)
    }

    fn check_name(&self, name: &str, value: &str) -> Result<(), WorkspaceError> {
        if is_valid_name(value) {
            Ok(())
        } else {
            Err(self.invalid(name, name_message(value)))
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, WorkspaceError> {
        match self.get(name) {
            None => Ok(None),
            Some(Yaml::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.invalid(
                name,
                format!("expected true or false, found {}", describe(other)),
            )),
        }
    }

    /// A mapping value as a JSON object; absent means `{}`.
    fn object(&self, name: &str) -> Result<Json, WorkspaceError> {
        match self.get(name) {
            None => Ok(empty_object()),
            Some(Yaml::Mapping(map)) => Ok(Json::Object(mapping_to_json(
                self.doc,
                map,
                &self.at(name),
            )?)),
            Some(other) => Err(self.invalid(
                name,
                format!("expected a mapping, found {}", describe(other)),
            )),
        }
    }

    /// A list value; absent means empty.
    fn list(&self, name: &str) -> Result<&'v [Yaml], WorkspaceError> {
        match self.get(name) {
            None => Ok(&[]),
            Some(Yaml::Sequence(items)) => Ok(items),
            Some(other) => {
                Err(self.invalid(name, format!("expected a list, found {}", describe(other))))
            }
        }
    }

    fn string_list(&self, name: &str, what: &str) -> Result<Vec<String>, WorkspaceError> {
        let mut out = Vec::new();
        for (i, item) in self.list(name)?.iter().enumerate() {
            match item {
                Yaml::String(s) => out.push(s.clone()),
                other => {
                    return Err(self.doc.invalid(
                        &extend(&self.at(name), Seg::Index(i)),
                        format!("expected {what}, found {}", describe(other)),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// A mapping of scalars, as strings.
    fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, WorkspaceError> {
        let mut out = BTreeMap::new();
        let Some(value) = self.get(name) else {
            return Ok(out);
        };
        let obj = Obj::new(self.doc, value, self.at(name), "a mapping of strings")?;
        for (k, v) in obj.map {
            let Some(k) = key_text(k) else {
                return Err(
                    self.invalid(name, format!("expected string keys, found {}", describe(k)))
                );
            };
            let text = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                Yaml::Bool(b) => b.to_string(),
                other => {
                    return Err(
                        obj.invalid(&k, format!("expected a string, found {}", describe(other)))
                    )
                }
            };
            out.insert(k, text);
        }
        Ok(out)
    }

    /// Every key not in `known`, converted to JSON.
    fn extra(&self, known: &[&str]) -> Result<BTreeMap<String, Json>, WorkspaceError> {
        let mut out = BTreeMap::new();
        for (k, v) in self.map {
            let Some(name) = key_text(k) else {
                return Err(self.doc.invalid(
                    &self.path,
                    format!("expected string keys, found {} as a key", describe(k)),
                ));
            };
            if known.contains(&name.as_str()) {
                continue;
            }
            let value = to_json(self.doc, v, &self.at(&name))?;
            out.insert(name, value);
        }
        Ok(out)
    }
}

fn quote_hint(value: &Yaml) -> &'static str {
    match value {
        Yaml::Number(_) | Yaml::Bool(_) => " (quote the value to make it a string)",
        _ => "",
    }
}

fn name_message(value: &str) -> String {
    format!(
        "expected a name matching {NAME_PATTERN} (a letter first, then letters, digits and '_', with single '-', '/' or '_' between them), found '{}'",
        shorten(value)
    )
}

// ---------------------------------------------------------------------------
// workspace.poly and block.poly
// ---------------------------------------------------------------------------

fn parse_workspace_value(doc: &Doc, value: &Yaml) -> Result<Workspace, WorkspaceError> {
    let obj = Obj::new(
        doc,
        value,
        Vec::new(),
        "a mapping with at least 'name' and 'organization'",
    )?;
    let name = obj.required_name("name")?;
    let organization = obj.required_name("organization")?;
    let description = obj.string("description")?;
    let labels = obj.string_map("labels")?;

    let mut blocks = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, item) in obj.list("blocks")?.iter().enumerate() {
        let path = extend(&obj.at("blocks"), Seg::Index(i));
        let block = Obj::new(
            doc,
            item,
            path,
            "a block with 'name' (and usually 'from' and 'config')",
        )?;
        let instance = BlockInstance {
            name: block.required_name("name")?,
            from: block.string("from")?,
            config: block.object("config")?,
            extra: block.extra(&["name", "from", "config"])?,
        };
        if let Some(first) = seen.insert(instance.name.clone(), i) {
            return Err(block.invalid(
                "name",
                format!(
                    "expected unique block names, found '{}' already used by blocks[{first}]",
                    instance.name
                ),
            ));
        }
        blocks.push(instance);
    }

    let mut workflows = Vec::new();
    let mut seen_workflows: BTreeMap<String, usize> = BTreeMap::new();
    for (i, item) in obj.list("workflows")?.iter().enumerate() {
        let path = extend(&obj.at("workflows"), Seg::Index(i));
        let wf = Obj::new(doc, item, path, "a workflow with 'name' and 'steps'")?;
        let wf_name = wf.required_name("name")?;
        if let Some(first) = seen_workflows.insert(wf_name.clone(), i) {
            return Err(wf.invalid(
                "name",
                format!("expected unique workflow names, found '{wf_name}' already used by workflows[{first}]"),
            ));
        }
        let mut steps = Vec::new();
        for (j, item) in wf.list("steps")?.iter().enumerate() {
            let path = extend(&wf.at("steps"), Seg::Index(j));
            let step = Obj::new(doc, item, path, "a step with 'name', 'block' and 'action'")?;
            steps.push(WorkflowStep {
                name: step.required_name("name")?,
                block: step.required_name("block")?,
                action: step.required_name("action")?,
                extra: step.extra(&["name", "block", "action"])?,
            });
        }
        workflows.push(Workflow {
            name: wf_name,
            allow_failure: wf.bool("allow_failure")?.unwrap_or(false),
            steps,
            extra: wf.extra(&["name", "allow_failure", "steps"])?,
        });
    }

    let config = match obj.get("config") {
        None => WorkspaceConfig::default(),
        Some(value) => {
            let config = Obj::new(
                doc,
                value,
                obj.at("config"),
                "a mapping of toolchain settings",
            )?;
            let image = match config.get("image") {
                None => None,
                Some(value) => {
                    let image = Obj::new(
                        doc,
                        value,
                        config.at("image"),
                        "a mapping with 'reference' and 'version'",
                    )?;
                    Some(ImageConfig {
                        reference: image.string("reference")?,
                        version: image_version(&image)?,
                        extra: image.extra(&["reference", "version"])?,
                    })
                }
            };
            WorkspaceConfig {
                image,
                extra: config.extra(&["image"])?,
            }
        }
    };

    let extraenv = obj.string_list("extraenv", "a 'KEY=value' string")?;
    for (i, entry) in extraenv.iter().enumerate() {
        let valid = entry
            .split_once('=')
            .is_some_and(|(name, _)| is_env_name(name));
        if !valid {
            return Err(doc.invalid(
                &extend(&obj.at("extraenv"), Seg::Index(i)),
                format!(
                    "expected 'KEY=value' with KEY made of letters, digits and '_', found '{}'",
                    shorten(entry)
                ),
            ));
        }
    }
    let extramounts = obj.string_list("extramounts", "a '/host:/container' string")?;

    Ok(Workspace {
        name,
        organization,
        description,
        labels,
        blocks,
        workflows,
        config,
        extraenv,
        extramounts,
        extra: obj.extra(&[
            "name",
            "organization",
            "description",
            "labels",
            "blocks",
            "workflows",
            "config",
            "extraenv",
            "extramounts",
        ])?,
    })
}

/// Image tags are strings, but `version: 12` is an easy slip; integers are
/// taken as written. A float is refused: YAML has already turned `3.10` into
/// `3.1`, so the intended tag cannot be recovered.
fn image_version(image: &Obj) -> Result<Option<String>, WorkspaceError> {
    match image.get("version") {
        Some(Yaml::Number(n)) if !n.is_f64() => Ok(Some(n.to_string())),
        _ => image.string("version"),
    }
}

fn parse_block_value(doc: &Doc, value: &Yaml) -> Result<BlockDef, WorkspaceError> {
    let obj = Obj::new(doc, value, Vec::new(), "a mapping with at least 'name'")?;
    let name = obj.required_name("name")?;
    let version = match obj.get("version") {
        None => None,
        Some(Yaml::String(v)) if is_semver(v) => Some(v.clone()),
        Some(other) => {
            return Err(obj.invalid(
                "version",
                format!(
                    "expected a SemVer version such as 0.1.0, found {}",
                    describe(other)
                ),
            ))
        }
    };
    let kind = obj.string("kind")?;
    let description = obj.string("description")?;
    let config = obj.object("config")?;
    let from = obj.string("from")?;

    let mut actions: Vec<Action> = Vec::new();
    for (i, item) in obj.list("actions")?.iter().enumerate() {
        let path = extend(&obj.at("actions"), Seg::Index(i));
        let action = Obj::new(
            doc,
            item,
            path.clone(),
            "an action with 'name' and 'playbook' or 'script'",
        )?;
        let action_name = action.required_name("name")?;
        let kind = match (action.get("playbook"), action.get("script")) {
            (Some(_), Some(_)) => {
                return Err(doc.invalid(
                    &path,
                    "expected exactly one of 'playbook' or 'script', found both",
                ))
            }
            (None, None) => {
                return Err(doc.invalid(
                    &path,
                    "expected exactly one of 'playbook' or 'script', found neither",
                ))
            }
            (Some(_), None) => {
                let playbook = action.required_string("playbook", "a playbook path")?;
                if playbook.trim().is_empty() {
                    return Err(action.invalid(
                        "playbook",
                        "expected a playbook path, found an empty string",
                    ));
                }
                ActionKind::Playbook(playbook)
            }
            (None, Some(script)) => ActionKind::Script(script_lines(&action, script)?),
        };
        if let Some(first) = actions.iter().position(|a| a.name == action_name) {
            return Err(action.invalid(
                "name",
                format!("expected unique action names in a block, found '{action_name}' already used by actions[{first}]"),
            ));
        }
        actions.push(Action {
            name: action_name,
            description: action.string("description")?,
            timeout: action_timeout(&action)?,
            retries: action_retries(&action)?,
            kind,
            extra: action.extra(&[
                "name",
                "description",
                "timeout",
                "retries",
                "playbook",
                "script",
            ])?,
        });
    }

    Ok(BlockDef {
        name,
        version,
        kind,
        description,
        config,
        actions,
        from,
        extra: obj.extra(&[
            "name",
            "version",
            "kind",
            "description",
            "config",
            "actions",
            "from",
        ])?,
    })
}

/// `timeout:` is a whole number of seconds, at least 1. Units (`10m`) are
/// refused rather than guessed at, and so is 0, which would read as either
/// "no limit" or "stop at once".
fn action_timeout(action: &Obj) -> Result<Option<u64>, WorkspaceError> {
    let expected = "expected a whole number of seconds greater than 0";
    match action.get("timeout") {
        None => Ok(None),
        Some(Yaml::Number(n)) => match n.as_u64() {
            Some(secs) if secs > 0 => Ok(Some(secs)),
            _ => Err(action.invalid("timeout", format!("{expected}, found the number {n}"))),
        },
        Some(other) => {
            Err(action.invalid("timeout", format!("{expected}, found {}", describe(other))))
        }
    }
}

/// Most `retries:` an action may ask for.
pub const MAX_RETRIES: u32 = 10;

/// `retries:` is a whole number from 0 to [`MAX_RETRIES`].
fn action_retries(action: &Obj) -> Result<Option<u32>, WorkspaceError> {
    let expected = format!("expected a whole number from 0 to {MAX_RETRIES}");
    match action.get("retries") {
        None => Ok(None),
        Some(Yaml::Number(n)) => match n.as_u64() {
            Some(r) if r <= u64::from(MAX_RETRIES) => Ok(Some(r as u32)),
            _ => Err(action.invalid("retries", format!("{expected}, found the number {n}"))),
        },
        Some(other) => {
            Err(action.invalid("retries", format!("{expected}, found {}", describe(other))))
        }
    }
}

/// `script:` is a list of lines; a single string is one line. YAML turns a
/// line like `- true` into a boolean, so scalars are taken in their YAML
/// spelling rather than refused.
fn script_lines(action: &Obj, value: &Yaml) -> Result<Vec<String>, WorkspaceError> {
    let scalar = |v: &Yaml| match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let lines = match value {
        Yaml::Sequence(items) => {
            let mut lines = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match scalar(item) {
                    Some(line) => lines.push(line),
                    None => {
                        return Err(action.doc.invalid(
                            &extend(&action.at("script"), Seg::Index(i)),
                            format!("expected a shell line, found {}", describe(item)),
                        ))
                    }
                }
            }
            lines
        }
        other => match scalar(other) {
            Some(line) => vec![line],
            None => {
                return Err(action.invalid(
                    "script",
                    format!("expected a list of shell lines, found {}", describe(other)),
                ))
            }
        },
    };
    if lines.is_empty() {
        return Err(action.invalid(
            "script",
            "expected at least one shell line, found an empty list",
        ));
    }
    Ok(lines)
}

/// Checks that each playbook of `def` is a relative path inside the
/// workspace naming a file of the bundle.
fn check_playbooks(
    doc: &Doc,
    def: &BlockDef,
    dir: &str,
    bundle: &Bundle,
) -> Result<(), WorkspaceError> {
    for (i, action) in def.actions.iter().enumerate() {
        let ActionKind::Playbook(playbook) = &action.kind else {
            continue;
        };
        let path = vec![key("actions"), Seg::Index(i), key("playbook")];
        if playbook.starts_with('/') {
            return Err(doc.invalid(
                &path,
                format!("expected a path relative to {dir}/, found the absolute path '{playbook}'"),
            ));
        }
        let Some(resolved) = join_within(dir, playbook) else {
            return Err(doc.invalid(
                &path,
                format!("expected a path inside the workspace, found '{playbook}', which climbs out of it"),
            ));
        };
        if bundle.read(&resolved).is_none() {
            return Err(doc.invalid(
                &path,
                format!(
                    "expected the playbook file {resolved} in the workspace, found no such file"
                ),
            ));
        }
    }
    Ok(())
}

/// `dir` + `rel`, resolved lexically; `None` if it climbs above the root.
fn join_within(dir: &str, rel: &str) -> Option<String> {
    let mut stack: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    for component in rel.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                stack.pop()?;
            }
            name => stack.push(name),
        }
    }
    Some(stack.join("/"))
}

/// The relative path from directory `from` to path `to` (both canonical,
/// bundle-relative).
fn relative_path(from: &str, to: &str) -> String {
    let from: Vec<&str> = from.split('/').filter(|c| !c.is_empty()).collect();
    let to: Vec<&str> = to.split('/').filter(|c| !c.is_empty()).collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; from.len() - common];
    parts.extend(&to[common..]);
    parts.join("/")
}

// ---------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------

struct DefSource<'a> {
    def: BlockDef,
    doc: Doc<'a>,
    dir: String,
}

/// A block definition with its `from:` chain applied.
#[derive(Clone)]
struct ResolvedDef {
    version: Option<String>,
    kind: Option<String>,
    description: Option<String>,
    dir: String,
    config: Json,
    /// Playbook paths relative to `dir`.
    actions: Vec<Action>,
}

struct Resolver<'s, 'a> {
    defs: &'s [DefSource<'a>],
    by_name: BTreeMap<&'s str, usize>,
    cache: BTreeMap<usize, ResolvedDef>,
}

impl Resolver<'_, '_> {
    fn resolve(
        &mut self,
        idx: usize,
        chain: &mut Vec<usize>,
    ) -> Result<ResolvedDef, WorkspaceError> {
        if let Some(done) = self.cache.get(&idx) {
            return Ok(done.clone());
        }
        let source = &self.defs[idx];
        if let Some(pos) = chain.iter().position(|&i| i == idx) {
            let names: Vec<&str> = chain[pos..]
                .iter()
                .chain(std::iter::once(&idx))
                .map(|&i| self.defs[i].def.name.as_str())
                .collect();
            return Err(source.doc.invalid(
                &[key("from")],
                format!(
                    "expected a chain of parent blocks that ends, found a cycle: {}",
                    names.join(" -> ")
                ),
            ));
        }
        let def = &source.def;
        let mut resolved = ResolvedDef {
            version: def.version.clone(),
            kind: def.kind.clone(),
            description: def.description.clone(),
            dir: source.dir.clone(),
            config: def.config.clone(),
            actions: def.actions.clone(),
        };
        if let Some(from) = &def.from {
            let parent_idx = self.find(from, &source.doc, &[key("from")])?;
            chain.push(idx);
            let parent = self.resolve(parent_idx, chain)?;
            chain.pop();
            inherit(&mut resolved, parent);
        }
        self.cache.insert(idx, resolved.clone());
        Ok(resolved)
    }

    /// The definition a `from:` value names: a local block name, or a pinned
    /// registry reference vendored under `blocks/`.
    fn find(&self, from: &str, doc: &Doc, path: &[Seg]) -> Result<usize, WorkspaceError> {
        if let Some(reference) = RegistryRef::parse(from) {
            return self.find_vendored(&reference, doc, path);
        }
        if !is_valid_name(from) {
            return Err(doc.invalid(path, name_message(from)));
        }
        self.by_name.get(from).copied().ok_or_else(|| {
            doc.invalid(
                path,
                format!(
                    "expected the name of a block defined by a block.poly under blocks/ ({}), found '{from}'",
                    self.defined()
                ),
            )
        })
    }

    fn find_vendored(
        &self,
        reference: &RegistryRef,
        doc: &Doc,
        path: &[Seg],
    ) -> Result<usize, WorkspaceError> {
        let raw = &reference.raw;
        let Some(version) = reference.pinned_version() else {
            let found = match reference.tag.as_deref() {
                None => "no tag".to_owned(),
                Some(tag) => format!("the tag ':{tag}'"),
            };
            return Err(doc.invalid(
                path,
                format!("registry block '{raw}' must be pinned to a version, e.g. :0.4.2; found {found}"),
            ));
        };
        let dirs = [
            format!("{BLOCKS_DIR}/{}", reference.repository),
            format!("{BLOCKS_DIR}/{}/{}", reference.host, reference.repository),
        ];
        let found = self
            .by_name
            .get(reference.repository.as_str())
            .copied()
            .or_else(|| self.defs.iter().position(|d| dirs.contains(&d.dir)));
        let Some(idx) = found else {
            return Err(WorkspaceError::RegistryBlockNotVendored {
                file: doc.file.to_owned(),
                line: locate(doc.text, path),
                key: path_string(path),
                reference: raw.clone(),
                expected: format!("{}/", dirs[0]),
            });
        };
        let vendored = &self.defs[idx];
        if let (Some(wanted), Some(have)) = (version, &vendored.def.version) {
            if wanted != have {
                return Err(doc.invalid(
                    path,
                    format!(
                        "registry block '{raw}' is vendored in {} with version {have}: expected version {wanted}",
                        vendored.doc.file
                    ),
                ));
            }
        }
        Ok(idx)
    }

    fn defined(&self) -> String {
        if self.by_name.is_empty() {
            "none are defined".into()
        } else {
            let names: Vec<&str> = self.by_name.keys().copied().collect();
            format!("defined: {}", names.join(", "))
        }
    }
}

/// Applies a parent under a child: the child's values win, the parent fills
/// gaps; configs deep-merge; the parent's actions the child does not redefine
/// are appended, with playbook paths made relative to the child's directory.
fn inherit(child: &mut ResolvedDef, parent: ResolvedDef) {
    if child.version.is_none() {
        child.version = parent.version;
    }
    if child.kind.is_none() {
        child.kind = parent.kind;
    }
    if child.description.is_none() {
        child.description = parent.description;
    }
    let own = std::mem::replace(&mut child.config, parent.config);
    merge_json(&mut child.config, own);
    for mut action in parent.actions {
        if child.actions.iter().any(|a| a.name == action.name) {
            continue;
        }
        if child.dir != parent.dir {
            if let ActionKind::Playbook(playbook) = &mut action.kind {
                if let Some(target) = join_within(&parent.dir, playbook) {
                    *playbook = relative_path(&child.dir, &target);
                }
            }
        }
        child.actions.push(action);
    }
}

/// Deep merge: objects merge key by key, any other value replaces.
pub fn merge_json(base: &mut Json, overlay: Json) {
    match (base, overlay) {
        (Json::Object(base), Json::Object(overlay)) => {
            for (k, v) in overlay {
                match base.get_mut(&k) {
                    Some(existing) => merge_json(existing, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// A `from:` that names a block in an OCI registry.
struct RegistryRef {
    raw: String,
    host: String,
    /// The path below the host, without tag or digest.
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl RegistryRef {
    /// `None` when `from` is a local name: a registry reference has a `/` and
    /// a first segment that looks like a host (`.` or `:` in it, or
    /// `localhost`), which a block name can never contain.
    fn parse(from: &str) -> Option<RegistryRef> {
        let (host, _) = from.split_once('/')?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return None;
        }
        let (name, digest) = match from.split_once('@') {
            Some((name, digest)) => (name, Some(digest.to_owned())),
            None => (from, None),
        };
        let (prefix, last) = name.rsplit_once('/').unwrap_or(("", name));
        let (last, tag) = match last.split_once(':') {
            Some((last, tag)) => (last, Some(tag.to_owned())),
            None => (last, None),
        };
        let full = if prefix.is_empty() {
            last.to_owned()
        } else {
            format!("{prefix}/{last}")
        };
        let repository = full
            .strip_prefix(host)
            .map(|r| r.trim_start_matches('/').to_owned())
            .unwrap_or(full.clone());
        Some(RegistryRef {
            raw: from.to_owned(),
            host: host.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// `Some(Some(version))` when pinned by a SemVer tag, `Some(None)` when
    /// pinned by digest only, `None` when not pinned.
    fn pinned_version(&self) -> Option<Option<&str>> {
        match (&self.tag, &self.digest) {
            (Some(tag), _) if is_semver(tag) => Some(Some(tag)),
            (Some(tag), _) if tag.strip_prefix('v').is_some_and(is_semver) => Some(Some(&tag[1..])),
            (_, Some(_)) => Some(None),
            _ => None,
        }
    }
}

fn resolve_all(
    mut resolver: Resolver,
    workspace: Workspace,
    ws_doc: &Doc,
    bundle: &Bundle,
) -> Result<LoadedWorkspace, WorkspaceError> {
    let mut blocks = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (i, instance) in workspace.blocks.iter().enumerate() {
        let (from, path) = match &instance.from {
            Some(from) => (
                from.as_str(),
                vec![key("blocks"), Seg::Index(i), key("from")],
            ),
            None => (
                instance.name.as_str(),
                vec![key("blocks"), Seg::Index(i), key("name")],
            ),
        };
        let idx = resolver.find(from, ws_doc, &path)?;
        used.insert(idx);
        let mut resolved = resolver.resolve(idx, &mut Vec::new())?;
        merge_json(&mut resolved.config, instance.config.clone());
        blocks.insert(
            instance.name.clone(),
            resolved_block(&instance.name, resolved, Some(from.to_owned()), bundle),
        );
    }
    for idx in 0..resolver.defs.len() {
        let name = resolver.defs[idx].def.name.clone();
        // An instance of the same name shadows the bare definition.
        if used.contains(&idx) || blocks.contains_key(&name) {
            continue;
        }
        let from = resolver.defs[idx].def.from.clone();
        let resolved = resolver.resolve(idx, &mut Vec::new())?;
        blocks.insert(name.clone(), resolved_block(&name, resolved, from, bundle));
    }

    for (i, workflow) in workspace.workflows.iter().enumerate() {
        for (j, step) in workflow.steps.iter().enumerate() {
            let at = |field: &str| {
                vec![
                    key("workflows"),
                    Seg::Index(i),
                    key("steps"),
                    Seg::Index(j),
                    key(field),
                ]
            };
            let Some(block) = blocks.get(&step.block) else {
                let names: Vec<&str> = blocks.keys().map(String::as_str).collect();
                return Err(ws_doc.invalid(
                    &at("block"),
                    format!(
                        "expected one of the workspace's blocks ({}), found '{}'",
                        names.join(", "),
                        step.block
                    ),
                ));
            };
            if block.action(&step.action).is_none() {
                let names: Vec<&str> = block.actions.iter().map(|a| a.name.as_str()).collect();
                return Err(ws_doc.invalid(
                    &at("action"),
                    format!(
                        "expected one of the actions of block '{}' ({}), found '{}'",
                        step.block,
                        names.join(", "),
                        step.action
                    ),
                ));
            }
        }
    }

    Ok(LoadedWorkspace { workspace, blocks })
}

fn resolved_block(
    name: &str,
    resolved: ResolvedDef,
    from: Option<String>,
    bundle: &Bundle,
) -> ResolvedBlock {
    let own = format!("artifacts/blocks/{name}/{INVENTORY_FILE}");
    let inventory = if bundle.read(&own).is_some() {
        Some(own)
    } else if bundle.read(INVENTORY_FILE).is_some() {
        Some(INVENTORY_FILE.to_owned())
    } else {
        None
    };
    ResolvedBlock {
        name: name.to_owned(),
        version: resolved.version,
        kind: resolved.kind,
        description: resolved.description,
        dir: resolved.dir,
        config: resolved.config,
        actions: resolved.actions,
        inventory,
        from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Entry;

    fn bundle(files: &[(&str, &str)]) -> Bundle {
        Bundle::from_entries(files.iter().map(|(path, text)| {
            (
                path.to_string(),
                Entry::File {
                    data: text.as_bytes().to_vec(),
                    executable: false,
                },
            )
        }))
        .unwrap()
    }

    fn keys(path: &[&str]) -> Vec<Seg> {
        path.iter()
            .map(|p| match p.parse::<usize>() {
                Ok(i) => Seg::Index(i),
                Err(_) => key(p),
            })
            .collect()
    }

    const WS: &str = "name: acme-ws\norganization: acme\n";

    #[test]
    fn names_follow_the_polycrate_rule() {
        for good in [
            "ab",
            "linux-patch",
            "ayedo/k8s/harbor",
            "a_b",
            "a1",
            "a_-b",
            "Linux_Patch2",
        ] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in [
            "a", "", "1ab", "-ab", "ab-", "a--b", "a//b", "/ab", "ab/", "../ab", "a.b", "a b",
            "ab/../cd",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn semver_is_checked() {
        for good in ["0.1.0", "1.2.3-rc.1", "1.0.0+build.5", "10.20.30"] {
            assert!(is_semver(good), "{good}");
        }
        for bad in ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "latest", ""] {
            assert!(!is_semver(bad), "{bad}");
        }
    }

    #[test]
    fn locate_finds_keys_items_and_falls_back_to_parents() {
        let text = "# comment\nname: x\nactions:\n  - name: a\n    playbook: a.yml\n\n  - {name: b, script: [echo]}\nconfig: {a: {b: 1}}\n";
        assert_eq!(locate(text, &keys(&["name"])), 2);
        assert_eq!(locate(text, &keys(&["actions"])), 3);
        assert_eq!(locate(text, &keys(&["actions", "0"])), 4);
        assert_eq!(locate(text, &keys(&["actions", "0", "playbook"])), 5);
        assert_eq!(locate(text, &keys(&["actions", "1"])), 7);
        assert_eq!(locate(text, &keys(&["actions", "1", "script", "0"])), 7);
        assert_eq!(locate(text, &keys(&["config", "a", "b"])), 8);
        // Missing keys report the mapping that should hold them.
        assert_eq!(locate(text, &keys(&["actions", "0", "missing"])), 4);
        assert_eq!(locate(text, &keys(&["actions", "9"])), 3);
        assert_eq!(locate(text, &keys(&["nothing"])), 2);
        assert_eq!(locate("", &keys(&["name"])), 1);
    }

    #[test]
    fn workspace_requires_name_and_organization() {
        let err = parse_workspace("name: acme-ws\ndescription: x\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "workspace.poly:1: organization: expected a name, found nothing (the key is required)"
        );
        let err = parse_workspace("# top\nname: acme ws\norganization: acme\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("workspace.poly:2: name: expected a name matching"),
            "{err}"
        );
        assert!(err.to_string().ends_with("found 'acme ws'"), "{err}");
        let err = parse_workspace("- a\n- b\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "workspace.poly:1: expected a mapping with at least 'name' and 'organization', found a list"
        );
    }

    #[test]
    fn workspace_keeps_unknown_keys_and_reads_everything_known() {
        let ws = parse_workspace(
            "name: acme-ws\norganization: acme\nlabels: {tier: 1, env: prod}\nalias: [a]\nevents: {handler: x}\n\
             extraenv: [FOO=bar, 'X_1=a=b']\nextramounts: ['/a:/b']\n\
             config: {image: {reference: r, version: 12}, blocksroot: blocks}\n\
             workflows:\n  - name: nightly\n    steps: []\n",
        )
        .unwrap();
        assert_eq!(ws.labels["tier"], "1");
        assert_eq!(ws.extra["alias"], serde_json::json!(["a"]));
        assert_eq!(ws.extra["events"], serde_json::json!({"handler": "x"}));
        assert_eq!(ws.extraenv, ["FOO=bar", "X_1=a=b"]);
        assert_eq!(ws.extramounts, ["/a:/b"]);
        let image = ws.config.image.as_ref().unwrap();
        assert_eq!(image.version.as_deref(), Some("12"));
        assert_eq!(ws.config.extra["blocksroot"], "blocks");
        assert!(!ws.workflows[0].allow_failure);
    }

    #[test]
    fn workspace_value_errors_name_the_key() {
        let cases = [
            ("extraenv: ['=x']\n", "workspace.poly:3: extraenv[0]: expected 'KEY=value' with KEY made of letters, digits and '_', found '=x'"),
            ("extraenv: [NOVALUE]\n", "workspace.poly:3: extraenv[0]: expected 'KEY=value' with KEY made of letters, digits and '_', found 'NOVALUE'"),
            ("config:\n  image:\n    version: 3.10\n", "workspace.poly:5: config.image.version: expected a string, found the number 3.1 (quote the value to make it a string)"),
            ("blocks:\n  - name: ab\n  - name: ab\n", "workspace.poly:5: blocks[1].name: expected unique block names, found 'ab' already used by blocks[0]"),
            ("blocks:\n  - from: ab\n", "workspace.poly:4: blocks[0].name: expected a name, found nothing (the key is required)"),
            ("blocks:\n  - name: ab\n    config: [1]\n", "workspace.poly:5: blocks[0].config: expected a mapping, found a list"),
            ("labels:\n  a: [1]\n", "workspace.poly:4: labels.a: expected a string, found a list"),
            ("workflows:\n  - name: wf\n    allow_failure: yes\n", "workspace.poly:5: workflows[0].allow_failure: expected true or false, found 'yes'"),
            ("other: .nan\n", "workspace.poly:3: other: expected a finite number, found .nan"),
        ];
        for (tail, expected) in cases {
            let err = parse_workspace(&format!("{WS}{tail}")).unwrap_err();
            assert_eq!(err.to_string(), expected, "for {tail:?}");
        }
    }

    #[test]
    fn yaml_syntax_errors_carry_line_and_column() {
        let err = parse_workspace("name: x\norganization: [acme\n").unwrap_err();
        let WorkspaceError::Syntax { line, column, .. } = &err else {
            panic!("unexpected {err}");
        };
        assert_eq!((*line, *column), (3, 1), "{err}");
        assert!(
            err.to_string()
                .starts_with("workspace.poly:3:1: invalid YAML: "),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "workspace.poly:3:1: invalid YAML: did not find expected ',' or ']', while parsing a flow sequence at line 2 column 15"
        );

        let err = parse_block("blocks/x/block.poly", "name: x\n  bad: indent\n").unwrap_err();
        assert!(
            err.to_string().starts_with("blocks/x/block.poly:2:"),
            "{err}"
        );
        let err = parse_workspace("a: 1\na: 2\n").unwrap_err();
        assert!(err.to_string().contains("duplicate entry"), "{err}");
    }

    #[test]
    fn empty_and_multi_document_files_are_refused() {
        assert_eq!(
            parse_workspace("# nothing yet\n").unwrap_err().to_string(),
            "workspace.poly:2: expected a mapping with at least 'name' and 'organization', found nothing"
        );
        let err = parse_workspace("name: a\n---\nname: b\n").unwrap_err();
        assert!(matches!(err, WorkspaceError::Syntax { .. }), "{err}");
    }

    #[test]
    fn merge_keys_are_applied() {
        let ws = parse_workspace(
            "defaults: &d {team: ops}\nname: acme-ws\norganization: acme\nlabels:\n  <<: *d\n  env: prod\n",
        )
        .unwrap();
        assert_eq!(ws.labels["team"], "ops");
    }

    const BLOCK_FILE_PATH: &str = "blocks/linux-patch/block.poly";

    #[test]
    fn actions_need_exactly_one_of_playbook_or_script() {
        let text = "name: linux-patch\nversion: 0.1.0\nconfig:\n  a: 1\n\nactions:\n  - name: patch\n    playbook: patch.yml\n    script: [echo]\n";
        let err = parse_block(BLOCK_FILE_PATH, text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "blocks/linux-patch/block.poly:7: actions[0]: expected exactly one of 'playbook' or 'script', found both"
        );
        let text = "name: linux-patch\nactions:\n  - name: patch\n  - name: other\n    description: nothing\n";
        let err = parse_block(BLOCK_FILE_PATH, text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "blocks/linux-patch/block.poly:3: actions[0]: expected exactly one of 'playbook' or 'script', found neither"
        );
    }

    #[test]
    fn block_errors_name_file_line_and_key() {
        let cases = [
            ("name: linux-patch\nversion: 1.0\n", "blocks/linux-patch/block.poly:2: version: expected a SemVer version such as 0.1.0, found the number 1.0"),
            ("name: linux-patch\nversion: v1\n", "blocks/linux-patch/block.poly:2: version: expected a SemVer version such as 0.1.0, found 'v1'"),
            ("name: linux-patch\nactions:\n  - name: a1\n    script: []\n", "blocks/linux-patch/block.poly:4: actions[0].script: expected at least one shell line, found an empty list"),
            ("name: linux-patch\nactions:\n  - name: a1\n    script: [{a: 1}]\n", "blocks/linux-patch/block.poly:4: actions[0].script[0]: expected a shell line, found a mapping"),
            ("name: linux-patch\nactions:\n  - name: a1\n    script: [echo]\n  - name: a1\n    script: [echo]\n", "blocks/linux-patch/block.poly:5: actions[1].name: expected unique action names in a block, found 'a1' already used by actions[0]"),
            ("name: linux-patch\nactions:\n  - name: 'bad name'\n    script: [echo]\n", "blocks/linux-patch/block.poly:3: actions[0].name: expected a name matching ^[a-zA-Z]+([-/_]?[a-zA-Z0-9_]+)+$ (a letter first, then letters, digits and '_', with single '-', '/' or '_' between them), found 'bad name'"),
            ("name: linux-patch\nconfig: x\n", "blocks/linux-patch/block.poly:2: config: expected a mapping, found 'x'"),
            ("name: ../etc\n", "blocks/linux-patch/block.poly:1: name: expected a name matching ^[a-zA-Z]+([-/_]?[a-zA-Z0-9_]+)+$ (a letter first, then letters, digits and '_', with single '-', '/' or '_' between them), found '../etc'"),
        ];
        for (text, expected) in cases {
            let err = parse_block(BLOCK_FILE_PATH, text).unwrap_err();
            assert_eq!(err.to_string(), expected, "for {text:?}");
        }
    }

    #[test]
    fn action_timeouts_are_whole_seconds_above_zero() {
        let block = |timeout: &str| {
            format!("name: linux-patch\nactions:\n  - name: patch\n    script: [echo]\n    timeout: {timeout}\n")
        };
        let def = parse_block(BLOCK_FILE_PATH, &block("600")).unwrap();
        assert_eq!(def.actions[0].timeout, Some(600));
        assert!(
            !def.actions[0].extra.contains_key("timeout"),
            "timeout is a known key, not an extra"
        );
        let def = parse_block(BLOCK_FILE_PATH, &block("~")).unwrap();
        assert_eq!(def.actions[0].timeout, None, "null means no limit");

        let expected = "blocks/linux-patch/block.poly:5: actions[0].timeout: expected a whole number of seconds greater than 0, found";
        for (value, found) in [
            ("0", "the number 0"),
            ("-5", "the number -5"),
            ("1.5", "the number 1.5"),
            ("10m", "'10m'"),
            ("'600'", "'600'"),
            ("[1]", "a list"),
            ("true", "the boolean true"),
        ] {
            let err = parse_block(BLOCK_FILE_PATH, &block(value)).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{expected} {found}"),
                "for {value}"
            );
        }
    }

    #[test]
    fn action_retries_are_whole_numbers_up_to_ten() {
        let block = |retries: &str| {
            format!("name: linux-patch\nactions:\n  - name: patch\n    script: [echo]\n    retries: {retries}\n")
        };
        let def = parse_block(BLOCK_FILE_PATH, &block("2")).unwrap();
        assert_eq!(def.actions[0].retries, Some(2));
        assert!(!def.actions[0].extra.contains_key("retries"));
        for bad in ["11", "-1", "1.5", "twice"] {
            let error = parse_block(BLOCK_FILE_PATH, &block(bad))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("blocks/linux-patch/block.poly:5: actions[0].retries: expected a whole number from 0 to 10"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn action_timeout_survives_the_json_round_trip() {
        let def = parse_block(
            BLOCK_FILE_PATH,
            "name: linux-patch\nactions:\n  - name: patch\n    script: [echo]\n    timeout: 30\n",
        )
        .unwrap();
        let json = serde_json::to_value(&def.actions[0]).unwrap();
        assert_eq!(json["timeout"], 30);
        let back: Action = serde_json::from_value(json).unwrap();
        assert_eq!(back, def.actions[0]);
    }

    #[test]
    fn script_accepts_a_single_string_and_scalar_lines() {
        let def = parse_block(
            BLOCK_FILE_PATH,
            "name: linux-patch\nactions:\n  - name: one\n    script: echo hi\n  - name: many\n    script: [echo a, true, 1]\n    prompt: {message: sure?}\n",
        )
        .unwrap();
        assert_eq!(
            def.actions[0].kind,
            ActionKind::Script(vec!["echo hi".into()])
        );
        assert_eq!(
            def.actions[1].kind,
            ActionKind::Script(vec!["echo a".into(), "true".into(), "1".into()])
        );
        assert_eq!(
            def.actions[1].extra["prompt"],
            serde_json::json!({"message": "sure?"})
        );
    }

    #[test]
    fn missing_workspace_poly_is_its_own_error() {
        let err = load(&bundle(&[("inventory.yml", "all: {}")])).unwrap_err();
        assert_eq!(err, WorkspaceError::MissingWorkspace);
        assert_eq!(
            err.to_string(),
            "workspace.poly is missing: expected it at the root of the workspace"
        );
    }

    fn base_files() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "blocks/base/block.poly",
                "name: base\nversion: 1.0.0\nkind: generic\nconfig:\n  a: {x: 1, y: 2}\n  list: [1, 2]\n  keep: base\nactions:\n  - name: patch\n    playbook: patch.yml\n  - name: check\n    playbook: playbooks/check.yml\n",
            ),
            ("blocks/base/patch.yml", "- hosts: all\n"),
            ("blocks/base/playbooks/check.yml", "- hosts: all\n"),
            (
                "blocks/team/child/block.poly",
                "name: team/child\nfrom: base\nconfig:\n  a: {y: 20, z: 30}\n  list: [3]\nactions:\n  - name: patch\n    script: [echo child]\n",
            ),
        ]
    }

    #[test]
    fn inheritance_merges_config_and_actions() {
        let mut files = base_files();
        files.push((
            "workspace.poly",
            "name: acme-ws\norganization: acme\nblocks:\n  - name: prod\n    from: team/child\n    config: {a: {z: 300, w: 4}}\n",
        ));
        files.push(("inventory.yml", "all: {}\n"));
        files.push(("artifacts/blocks/prod/inventory.yml", "all: {}\n"));
        let ws = load(&bundle(&files)).unwrap();

        let prod = ws.block("prod").unwrap();
        assert_eq!(prod.dir, "blocks/team/child");
        assert_eq!(prod.version.as_deref(), Some("1.0.0"), "inherited");
        assert_eq!(prod.kind.as_deref(), Some("generic"));
        assert_eq!(prod.from.as_deref(), Some("team/child"));
        assert_eq!(
            prod.config,
            serde_json::json!({"a": {"x": 1, "y": 20, "z": 300, "w": 4}, "list": [3], "keep": "base"})
        );
        let names: Vec<&str> = prod.actions.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["patch", "check"]);
        assert_eq!(
            prod.action("patch").unwrap().kind,
            ActionKind::Script(vec!["echo child".into()])
        );
        assert_eq!(
            prod.action("check").unwrap().kind,
            ActionKind::Playbook("../../base/playbooks/check.yml".into())
        );
        assert_eq!(
            prod.inventory.as_deref(),
            Some("artifacts/blocks/prod/inventory.yml")
        );

        // Definitions no instance uses are runnable as themselves; used
        // ones are reached through their instances only.
        let base = ws.block("base").unwrap();
        assert_eq!(base.dir, "blocks/base");
        assert_eq!(
            base.action("patch").unwrap().kind,
            ActionKind::Playbook("patch.yml".into())
        );
        assert_eq!(base.inventory.as_deref(), Some("inventory.yml"));
        assert!(ws.block("team/child").is_none());
        assert_eq!(ws.blocks.len(), 2);
    }

    #[test]
    fn an_instance_without_from_uses_the_block_of_its_name_and_shadows_it() {
        let mut files = base_files();
        files.push((
            "workspace.poly",
            "name: acme-ws\norganization: acme\nblocks:\n  - name: base\n    config: {keep: instance}\n",
        ));
        let ws = load(&bundle(&files)).unwrap();
        let base = ws.block("base").unwrap();
        assert_eq!(base.config["keep"], "instance");
        assert_eq!(base.inventory, None);
        assert_eq!(ws.blocks.len(), 2);
    }

    fn load_err(workspace: &str, extra: &[(&'static str, &'static str)]) -> String {
        let mut files = base_files();
        files.extend_from_slice(extra);
        let text = format!("name: acme-ws\norganization: acme\n{workspace}");
        let text: &'static str = Box::leak(text.into_boxed_str());
        files.push(("workspace.poly", text));
        load(&bundle(&files)).unwrap_err().to_string()
    }

    #[test]
    fn resolution_errors_name_file_line_and_key() {
        assert_eq!(
            load_err("blocks:\n  - name: prod\n    from: nope\n", &[]),
            "workspace.poly:5: blocks[0].from: expected the name of a block defined by a block.poly under blocks/ (defined: base, team/child), found 'nope'"
        );
        assert_eq!(
            load_err("blocks:\n  - name: nope\n", &[]),
            "workspace.poly:4: blocks[0].name: expected the name of a block defined by a block.poly under blocks/ (defined: base, team/child), found 'nope'"
        );
        assert_eq!(
            load_err("", &[("blocks/a/block.poly", "name: loop-a\nfrom: loop-b\n"), ("blocks/b/block.poly", "name: loop-b\nfrom: loop-a\n")]),
            "blocks/a/block.poly:2: from: expected a chain of parent blocks that ends, found a cycle: loop-a -> loop-b -> loop-a"
        );
        assert_eq!(
            load_err("", &[("blocks/dup/block.poly", "# again\nname: base\n")]),
            "blocks/dup/block.poly:2: name: expected each block name to be defined once, found 'base' also defined in blocks/base/block.poly"
        );
        assert_eq!(
            load_err("", &[("blocks/x/block.poly", "name: xx\nactions:\n  - name: run\n    playbook: missing.yml\n")]),
            "blocks/x/block.poly:4: actions[0].playbook: expected the playbook file blocks/x/missing.yml in the workspace, found no such file"
        );
        assert_eq!(
            load_err("", &[("blocks/x/block.poly", "name: xx\nactions:\n  - name: run\n    playbook: ../../../etc/passwd\n")]),
            "blocks/x/block.poly:4: actions[0].playbook: expected a path inside the workspace, found '../../../etc/passwd', which climbs out of it"
        );
        assert_eq!(
            load_err("", &[("blocks/x/block.poly", "name: xx\nactions:\n  - name: run\n    playbook: /etc/passwd\n")]),
            "blocks/x/block.poly:4: actions[0].playbook: expected a path relative to blocks/x/, found the absolute path '/etc/passwd'"
        );
        assert_eq!(
            load_err("workflows:\n  - name: nightly\n    steps:\n      - name: one\n        block: base\n        action: nope\n", &[]),
            "workspace.poly:8: workflows[0].steps[0].action: expected one of the actions of block 'base' (patch, check), found 'nope'"
        );
        assert_eq!(
            load_err("workflows:\n  - name: nightly\n    steps:\n      - {name: one, block: nope, action: patch}\n", &[]),
            "workspace.poly:6: workflows[0].steps[0].block: expected one of the workspace's blocks (base, team/child), found 'nope'"
        );
    }

    #[test]
    fn registry_blocks_must_be_pinned_and_vendored() {
        let registry = "cargo.ayedo.cloud/ayedo/infra/windows-patching";
        for (from, found) in [
            (registry.to_owned(), "no tag"),
            (format!("{registry}:latest"), "the tag ':latest'"),
            (format!("{registry}:main"), "the tag ':main'"),
        ] {
            let ws = format!("blocks:\n  - name: win\n    from: {from}\n");
            assert_eq!(
                load_err(&ws, &[]),
                format!("workspace.poly:5: blocks[0].from: registry block '{from}' must be pinned to a version, e.g. :0.4.2; found {found}")
            );
        }
        let ws = format!("blocks:\n  - name: win\n    from: {registry}:0.4.2\n");
        assert_eq!(
            load_err(&ws, &[]),
            format!("workspace.poly:5: blocks[0].from: registry block '{registry}:0.4.2' is not vendored in the workspace: expected its block.poly under blocks/ayedo/infra/windows-patching/; Muster does not pull blocks, so pull it with `polycrate blocks pull {registry}:0.4.2` and add it to the workspace")
        );
        let vendored = ("blocks/ayedo/infra/windows-patching/block.poly", "name: ayedo/infra/windows-patching\nversion: 0.4.1\nactions:\n  - name: patch\n    script: [echo]\n");
        assert_eq!(
            load_err(&ws, &[vendored]),
            format!("workspace.poly:5: blocks[0].from: registry block '{registry}:0.4.2' is vendored in blocks/ayedo/infra/windows-patching/block.poly with version 0.4.1: expected version 0.4.2")
        );

        let mut files = base_files();
        files.push(("blocks/cargo.ayedo.cloud/ayedo/infra/windows-patching/block.poly", "name: windows-patching\nversion: 0.4.2\nconfig: {window: any}\nactions:\n  - name: patch\n    script: [echo]\n"));
        let text =
            format!("name: acme-ws\norganization: acme\n{ws}    config: {{window: 'Sun 02:00'}}\n");
        files.push(("workspace.poly", Box::leak(text.into_boxed_str())));
        let loaded = load(&bundle(&files)).unwrap();
        let win = loaded.block("win").unwrap();
        assert_eq!(
            win.dir,
            "blocks/cargo.ayedo.cloud/ayedo/infra/windows-patching"
        );
        assert_eq!(win.config["window"], "Sun 02:00");
        assert_eq!(win.from.as_deref(), Some(&*format!("{registry}:0.4.2")));
    }

    #[test]
    fn registry_references_parse() {
        let r = RegistryRef::parse("registry.example.com:5000/team/block:1.2.3").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("registry.example.com:5000", "team/block", Some("1.2.3"))
        );
        let r = RegistryRef::parse("localhost/x@sha256:abc").unwrap();
        assert_eq!(
            (r.repository.as_str(), r.pinned_version()),
            ("x", Some(None))
        );
        assert!(RegistryRef::parse("ayedo/k8s/harbor").is_none());
        assert!(RegistryRef::parse("linux-patch").is_none());
    }

    #[test]
    fn loaded_workspace_round_trips_through_json() {
        let mut files = base_files();
        files.push((
            "workspace.poly",
            "name: acme-ws\norganization: acme\nmeta: {owner: ops}\nconfig: {image: {reference: r}, globals: {a: 1}}\nblocks:\n  - name: prod\n    from: team/child\n    extra_key: 1\n",
        ));
        let ws = load(&bundle(&files)).unwrap();
        let json = serde_json::to_string(&ws).unwrap();
        let back: LoadedWorkspace = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ws);
        let value: Json = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value["blocks"]["base"]["actions"][0],
            serde_json::json!({"name": "patch", "playbook": "patch.yml"})
        );
        assert_eq!(
            value["workspace"]["meta"],
            serde_json::json!({"owner": "ops"})
        );
    }

    #[test]
    fn relative_paths_between_directories() {
        assert_eq!(relative_path("blocks/a", "blocks/b/x.yml"), "../b/x.yml");
        assert_eq!(relative_path("blocks/a/b", "blocks/a/x.yml"), "../x.yml");
        assert_eq!(relative_path("blocks/a", "blocks/a/sub/x.yml"), "sub/x.yml");
        assert_eq!(
            join_within("blocks/a", "./p/../x.yml").as_deref(),
            Some("blocks/a/x.yml")
        );
        assert_eq!(join_within("blocks/a", "../../../x"), None);
    }

    #[test]
    fn deep_merge_rules() {
        let mut base = serde_json::json!({"a": {"b": 1, "c": [1]}, "d": 1});
        merge_json(
            &mut base,
            serde_json::json!({"a": {"c": [2], "e": null}, "d": {"x": 1}}),
        );
        assert_eq!(
            base,
            serde_json::json!({"a": {"b": 1, "c": [2], "e": null}, "d": {"x": 1}})
        );
    }
}
