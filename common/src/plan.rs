//! The plan of one action run: everything an executor needs to run a block's
//! action from a loaded workspace, with no YAML and no workspace logic left.
//!
//! [`plan`] picks the block and action, the image, the working directory, the
//! command, and the variables a playbook sees; [`JobPlan`] then renders the
//! argv, working directory and environment for a given workspace root (the
//! container's `/workspace`, or a scratch directory for the process
//! executor), matching what `polycrate run` does so existing blocks work
//! unchanged.
//!
//! Decisions the reference leaves open:
//! - `extra_vars` are Ansible extra variables: top-level keys of the vars
//!   file that win over everything (as `-e` does). They do not change
//!   `block.config`. Scripts see them as `EXTRA_VARS` (a JSON object) and as
//!   flattened `EXTRA_VARS_<KEY>` variables.
//! - Environment names derived from data are always prefixed (`WORKSPACE_`,
//!   `BLOCK_`, `ACTION_`, `EXTRA_VARS`), so values from a trigger can never
//!   replace `PATH` or similar; only the workspace's own `extraenv` can.
//! - `IN_CONTAINER` depends on the executor, so the executor sets it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::workspace::{ActionKind, LoadedWorkspace};

/// Longest value put into one derived environment variable. Linux refuses to
/// exec with a single variable over 128 KiB; the vars file carries the full
/// value anyway, so oversized (and NUL-containing) values are left out.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;

/// What a runner needs to execute one action.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobPlan {
    pub workspace: String,
    pub organization: String,
    pub block: String,
    pub block_version: Option<String>,
    pub action: String,
    /// `<reference>:<version>` from the workspace's `config.image` (the
    /// reference alone without a version); `None` means the runner's default.
    pub image: Option<String>,
    /// Bundle-relative directory of the block; the action runs there.
    pub workdir: String,
    pub command: JobCommand,
    /// The variables the playbook sees: `workspace`, `block`, `action` as
    /// Polycrate's snapshot gives them, plus the extra vars as top-level keys
    /// (winning on conflicts). Paths that depend on where the workspace is
    /// unpacked are added by [`JobPlan::vars_for`].
    pub vars: Json,
    /// `KEY=value` entries from `workspace.poly`, applied last.
    pub extraenv: Vec<String>,
    /// The action's `timeout:`: how long the job may run once started,
    /// enforced by the runner. Plans made before timeouts existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// The action's `retries:`: further attempts when the runner is lost.
    /// The coordinator acts on it; the runner does not need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// The command of a plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobCommand {
    Playbook {
        /// Relative to the plan's `workdir`.
        playbook: String,
        /// Bundle-relative.
        inventory: Option<String>,
    },
    Script {
        lines: Vec<String>,
    },
}

/// Why no plan could be made; both are mistakes of the caller (a 404/422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown block '{block}': expected one of {}", list(.available))]
    UnknownBlock {
        block: String,
        available: Vec<String>,
    },
    #[error("block '{block}' has no action '{action}': expected one of {}", list(.available))]
    UnknownAction {
        block: String,
        action: String,
        available: Vec<String>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "nothing (there are none)".into()
    } else {
        names.join(", ")
    }
}

/// Plans `action` of `block` in `ws` with the trigger's `extra_vars`.
pub fn plan(
    ws: &LoadedWorkspace,
    block: &str,
    action: &str,
    extra_vars: &Map<String, Json>,
) -> Result<JobPlan, PlanError> {
    let resolved = ws.block(block).ok_or_else(|| PlanError::UnknownBlock {
        block: block.to_owned(),
        available: ws.blocks.keys().cloned().collect(),
    })?;
    let act = resolved
        .action(action)
        .ok_or_else(|| PlanError::UnknownAction {
            block: block.to_owned(),
            action: action.to_owned(),
            available: resolved.actions.iter().map(|a| a.name.clone()).collect(),
        })?;
    let workspace = &ws.workspace;

    let image = workspace.config.image.as_ref().and_then(|image| {
        match (&image.reference, &image.version) {
            (Some(reference), Some(version)) => Some(format!("{reference}:{version}")),
            (Some(reference), None) => Some(reference.clone()),
            (None, _) => None,
        }
    });

    let command = match &act.kind {
        ActionKind::Playbook(playbook) => JobCommand::Playbook {
            playbook: playbook.clone(),
            inventory: resolved.inventory.clone(),
        },
        ActionKind::Script(lines) => JobCommand::Script {
            lines: lines.clone(),
        },
    };

    let mut ws_vars = Map::new();
    ws_vars.insert("name".into(), Json::from(workspace.name.clone()));
    ws_vars.insert(
        "organization".into(),
        Json::from(workspace.organization.clone()),
    );
    if let Some(description) = &workspace.description {
        ws_vars.insert("description".into(), Json::from(description.clone()));
    }
    ws_vars.insert("labels".into(), to_json(&workspace.labels));
    ws_vars.insert("config".into(), to_json(&workspace.config));
    for (key, value) in &workspace.extra {
        ws_vars.entry(key.clone()).or_insert_with(|| value.clone());
    }

    let mut block_vars = Map::new();
    block_vars.insert("name".into(), Json::from(resolved.name.clone()));
    insert_some(&mut block_vars, "version", &resolved.version);
    insert_some(&mut block_vars, "kind", &resolved.kind);
    insert_some(&mut block_vars, "description", &resolved.description);
    insert_some(&mut block_vars, "from", &resolved.from);
    block_vars.insert("dir".into(), Json::from(resolved.dir.clone()));
    block_vars.insert("config".into(), resolved.config.clone());

    let mut vars = Map::new();
    vars.insert("workspace".into(), Json::Object(ws_vars));
    vars.insert("block".into(), Json::Object(block_vars));
    vars.insert("action".into(), to_json(act));
    for (key, value) in extra_vars {
        vars.insert(key.clone(), value.clone());
    }

    Ok(JobPlan {
        workspace: workspace.name.clone(),
        organization: workspace.organization.clone(),
        block: resolved.name.clone(),
        block_version: resolved.version.clone(),
        action: act.name.clone(),
        image,
        workdir: resolved.dir.clone(),
        command,
        vars: Json::Object(vars),
        extraenv: workspace.extraenv.clone(),
        timeout_secs: act.timeout,
        retries: act.retries,
    })
}

fn insert_some(map: &mut Map<String, Json>, key: &str, value: &Option<String>) {
    if let Some(value) = value {
        map.insert(key.to_owned(), Json::from(value.clone()));
    }
}

/// Serializes model types that are plain data (string maps, derived serde
/// impls without custom logic); those cannot fail.
fn to_json<T: Serialize>(value: &T) -> Json {
    serde_json::to_value(value).unwrap_or(Json::Null)
}

impl JobPlan {
    /// The argv to run in [`JobPlan::working_dir`], with the vars JSON (see
    /// [`JobPlan::vars_for`]) written at `vars_file`:
    /// `ansible-playbook [-i <root>/<inventory>] <playbook> -e @<vars_file>`,
    /// or `bash -euo pipefail -c <lines joined by newlines>`.
    pub fn argv(&self, workspace_root: &str, vars_file: &str) -> Vec<String> {
        match &self.command {
            JobCommand::Playbook {
                playbook,
                inventory,
            } => {
                let mut argv = vec!["ansible-playbook".to_owned()];
                if let Some(inventory) = inventory {
                    argv.push("-i".into());
                    argv.push(join(workspace_root, inventory));
                }
                argv.push(playbook.clone());
                argv.push("-e".into());
                argv.push(format!("@{vars_file}"));
                argv
            }
            JobCommand::Script { lines } => vec![
                "bash".into(),
                "-euo".into(),
                "pipefail".into(),
                "-c".into(),
                lines.join("\n"),
            ],
        }
    }

    /// `<root>/<workdir>`.
    pub fn working_dir(&self, workspace_root: &str) -> String {
        join(workspace_root, &self.workdir)
    }

    /// The vars with the paths Polycrate's snapshot has and that depend on
    /// where the workspace is: `workspace.path`, `block.workdir.path` and
    /// `block.artifacts.path`. Write this, not `vars`, to the vars file.
    pub fn vars_for(&self, workspace_root: &str) -> Json {
        let mut vars = self.vars.clone();
        if let Some(Json::Object(ws)) = vars.get_mut("workspace") {
            ws.entry("path")
                .or_insert_with(|| Json::from(join(workspace_root, "")));
        }
        if let Some(Json::Object(block)) = vars.get_mut("block") {
            block.entry("workdir").or_insert_with(
                || serde_json::json!({ "path": join(workspace_root, &self.workdir) }),
            );
            block.entry("artifacts").or_insert_with(|| {
                serde_json::json!({
                    "path": join(workspace_root, &format!("artifacts/blocks/{}", self.block))
                })
            });
        }
        vars
    }

    /// The environment as `polycrate run` sets it:
    ///
    /// - `POLYCRATE_WORKSPACE` (the root), `POLYCRATE_BLOCK`,
    ///   `POLYCRATE_BLOCK_WORKDIR`, `POLYCRATE_ACTION`, `IN_CI=true`;
    /// - `ANSIBLE_INVENTORY` (when there is an inventory),
    ///   `ANSIBLE_HOST_KEY_CHECKING=False`, `ANSIBLE_STDOUT_CALLBACK=default`,
    ///   `PYTHONUNBUFFERED=1`; colour is not forced;
    /// - the `workspace`, `block` and `action` vars flattened: nested keys
    ///   joined with `_`, upper-cased, other characters as `_`, under the
    ///   prefixes `WORKSPACE_`, `BLOCK_`, `ACTION_` (`block.config.patch_profile`
    ///   is `BLOCK_CONFIG_PATCH_PROFILE`, `workspace.name` is `WORKSPACE_NAME`).
    ///   Scalars are their string form, lists JSON, and every nested object is
    ///   also given whole as JSON (`BLOCK_CONFIG`). Nulls are left out. When
    ///   two keys flatten to the same name, the first in sorted key order wins;
    ///
    /// - `EXTRA_VARS` (the extra vars as a JSON object, `{}` when none) and each
    ///   extra var flattened under `EXTRA_VARS_`;
    /// - last, the workspace's `extraenv` entries, which override anything.
    ///
    /// Derived values over [`MAX_ENV_VALUE_BYTES`] or containing NUL are left
    /// out. `IN_CONTAINER` is for the executor to add.
    pub fn environment(&self, workspace_root: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |key: &str, value: String| {
            env.insert(key.to_owned(), value);
        };
        set("POLYCRATE_WORKSPACE", join(workspace_root, ""));
        set("POLYCRATE_BLOCK", self.block.clone());
        set("POLYCRATE_BLOCK_WORKDIR", self.working_dir(workspace_root));
        set("POLYCRATE_ACTION", self.action.clone());
        set("IN_CI", "true".into());
        if let JobCommand::Playbook {
            inventory: Some(inventory),
            ..
        } = &self.command
        {
            set("ANSIBLE_INVENTORY", join(workspace_root, inventory));
        }
        set("ANSIBLE_HOST_KEY_CHECKING", "False".into());
        set("ANSIBLE_STDOUT_CALLBACK", "default".into());
        set("PYTHONUNBUFFERED", "1".into());

        let mut extra = Map::new();
        for (prefix, key) in [
            ("WORKSPACE", "workspace"),
            ("BLOCK", "block"),
            ("ACTION", "action"),
        ] {
            match self.vars.get(key) {
                Some(Json::Object(object)) => flatten_object(prefix, object, &mut env),
                Some(other) => flatten(prefix, other, &mut env),
                None => {}
            }
        }
        if let Json::Object(vars) = &self.vars {
            for (key, value) in vars {
                if !matches!(key.as_str(), "workspace" | "block" | "action") {
                    extra.insert(key.clone(), value.clone());
                }
            }
        }
        let extra_json = Json::Object(extra);
        if let Some(value) = env_value(&extra_json) {
            env.insert("EXTRA_VARS".into(), value);
        }
        if let Json::Object(extra) = &extra_json {
            flatten_object("EXTRA_VARS", extra, &mut env);
        }

        for entry in &self.extraenv {
            if let Some((key, value)) = entry.split_once('=') {
                env.insert(key.to_owned(), value.to_owned());
            }
        }
        env
    }
}

/// Flattens the children of `object` under `prefix`, in sorted key order
/// (independent of how the JSON map orders keys), first name wins.
fn flatten_object(prefix: &str, object: &Map<String, Json>, env: &mut BTreeMap<String, String>) {
    let mut keys: Vec<&String> = object.keys().collect();
    keys.sort();
    for key in keys {
        let name = format!("{prefix}_{}", env_name(key));
        flatten(&name, &object[key.as_str()], env);
    }
}

fn flatten(name: &str, value: &Json, env: &mut BTreeMap<String, String>) {
    if let Some(text) = env_value(value) {
        env.entry(name.to_owned()).or_insert(text);
    }
    if let Json::Object(object) = value {
        flatten_object(name, object, env);
    }
}

/// The string form of a value for the environment; `None` for null and for
/// values that cannot or should not be passed (see [`MAX_ENV_VALUE_BYTES`]).
fn env_value(value: &Json) -> Option<String> {
    let text = match value {
        Json::Null => return None,
        Json::String(s) => s.clone(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::Array(_) | Json::Object(_) => value.to_string(),
    };
    (text.len() <= MAX_ENV_VALUE_BYTES && !text.contains('\0')).then_some(text)
}

/// `patch-profile.x` becomes `PATCH_PROFILE_X`.
fn env_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Joins a root directory and a bundle-relative path with exactly one `/`
/// (`/workspace` + `blocks/x` is `/workspace/blocks/x`, `/` + `x` is `/x`).
fn join(root: &str, rel: &str) -> String {
    let rel = rel.trim_start_matches('/');
    if root.is_empty() {
        return if rel.is_empty() {
            ".".into()
        } else {
            rel.to_owned()
        };
    }
    let base = root.trim_end_matches('/');
    match (base.is_empty(), rel.is_empty()) {
        (true, true) => "/".into(),
        (false, true) => base.to_owned(),
        (_, false) => format!("{base}/{rel}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Bundle, Entry};
    use crate::workspace::load;
    use serde_json::json;

    fn workspace(ws: &str) -> LoadedWorkspace {
        let files = [
            ("workspace.poly", ws),
            (
                "blocks/app/block.poly",
                "name: app\nversion: 2.0.0\nkind: generic\nconfig:\n  db: {host: localhost, port: 5432}\n  tags: [a, b]\n  empty: ~\n  weird-key.x: 1\nactions:\n  - name: deploy\n    description: Deploys\n    playbook: deploy.yml\n    timeout: 900\n  - name: hello\n    script: [echo one, echo two]\n",
            ),
            ("blocks/app/deploy.yml", "- hosts: all\n"),
            ("inventory.yml", "all: {}\n"),
        ];
        let bundle = Bundle::from_entries(files.iter().map(|(p, t)| {
            (
                p.to_string(),
                Entry::File {
                    data: t.as_bytes().to_vec(),
                    executable: false,
                },
            )
        }))
        .unwrap();
        load(&bundle).unwrap()
    }

    const WS: &str = "name: acme-ws\norganization: acme\ndescription: Demo\nconfig: {image: {reference: muster/ansible, version: bookworm}}\nextraenv: [HTTP_PROXY=http://proxy:3128, BLOCK_NAME=overridden]\nblocks:\n  - name: prod\n    from: app\n    config: {db: {host: db.prod}}\n";

    #[test]
    fn plans_a_playbook_action() {
        let ws = workspace(WS);
        let extra = json!({"patch_profile": "security-only", "block": "shadowed?"});
        let p = plan(&ws, "prod", "deploy", extra.as_object().unwrap()).unwrap();
        assert_eq!(p.workspace, "acme-ws");
        assert_eq!(p.organization, "acme");
        assert_eq!(p.block, "prod");
        assert_eq!(p.block_version.as_deref(), Some("2.0.0"));
        assert_eq!(p.image.as_deref(), Some("muster/ansible:bookworm"));
        assert_eq!(p.workdir, "blocks/app");
        assert_eq!(
            p.command,
            JobCommand::Playbook {
                playbook: "deploy.yml".into(),
                inventory: Some("inventory.yml".into())
            }
        );
        // Extra vars are top-level and win, even over the snapshot keys.
        assert_eq!(p.vars["patch_profile"], "security-only");
        assert_eq!(p.vars["block"], "shadowed?");
        assert_eq!(
            p.argv("/workspace", "/tmp/vars.json"),
            [
                "ansible-playbook",
                "-i",
                "/workspace/inventory.yml",
                "deploy.yml",
                "-e",
                "@/tmp/vars.json"
            ]
        );
        assert_eq!(p.working_dir("/workspace/"), "/workspace/blocks/app");
        assert_eq!(p.timeout_secs, Some(900));
    }

    #[test]
    fn vars_carry_the_snapshot() {
        let ws = workspace(WS);
        let p = plan(&ws, "prod", "deploy", &Map::new()).unwrap();
        assert_eq!(p.vars["workspace"]["name"], "acme-ws");
        assert_eq!(p.vars["workspace"]["organization"], "acme");
        assert_eq!(
            p.vars["workspace"]["config"]["image"]["reference"],
            "muster/ansible"
        );
        assert_eq!(p.vars["block"]["name"], "prod");
        assert_eq!(p.vars["block"]["version"], "2.0.0");
        assert_eq!(
            p.vars["block"]["config"]["db"],
            json!({"host": "db.prod", "port": 5432})
        );
        assert_eq!(
            p.vars["action"],
            json!({"name": "deploy", "description": "Deploys", "playbook": "deploy.yml", "timeout": 900})
        );
        let with_paths = p.vars_for("/workspace");
        assert_eq!(with_paths["workspace"]["path"], "/workspace");
        assert_eq!(
            with_paths["block"]["workdir"]["path"],
            "/workspace/blocks/app"
        );
        assert_eq!(
            with_paths["block"]["artifacts"]["path"],
            "/workspace/artifacts/blocks/prod"
        );
    }

    #[test]
    fn plans_a_script_action() {
        let ws = workspace("name: acme-ws\norganization: acme\n");
        let p = plan(&ws, "app", "hello", &Map::new()).unwrap();
        assert_eq!(p.image, None);
        assert_eq!(
            p.command,
            JobCommand::Script {
                lines: vec!["echo one".into(), "echo two".into()]
            }
        );
        assert_eq!(
            p.argv("/w", "/v.json"),
            ["bash", "-euo", "pipefail", "-c", "echo one\necho two"]
        );
    }

    #[test]
    fn image_without_version_is_the_reference_alone() {
        let ws =
            workspace("name: acme-ws\norganization: acme\nconfig: {image: {reference: img}}\n");
        assert_eq!(
            plan(&ws, "app", "hello", &Map::new())
                .unwrap()
                .image
                .as_deref(),
            Some("img")
        );
        let ws = workspace("name: acme-ws\norganization: acme\nconfig: {image: {version: '1'}}\n");
        assert_eq!(plan(&ws, "app", "hello", &Map::new()).unwrap().image, None);
    }

    #[test]
    fn unknown_block_or_action_lists_what_exists() {
        let ws = workspace(WS);
        let err = plan(&ws, "nope", "deploy", &Map::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown block 'nope': expected one of prod"
        );
        let err = plan(&ws, "prod", "nope", &Map::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "block 'prod' has no action 'nope': expected one of deploy, hello"
        );
        assert_eq!(
            err,
            PlanError::UnknownAction {
                block: "prod".into(),
                action: "nope".into(),
                available: vec!["deploy".into(), "hello".into()],
            }
        );
    }

    #[test]
    fn environment_matches_polycrate() {
        let ws = workspace(WS);
        let extra = json!({"patch_profile": "security-only", "opts": {"dry-run": true, "n": null}});
        let p = plan(&ws, "prod", "deploy", extra.as_object().unwrap()).unwrap();
        let env = p.environment("/workspace");
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("POLYCRATE_WORKSPACE"), Some("/workspace"));
        assert_eq!(get("POLYCRATE_BLOCK"), Some("prod"));
        assert_eq!(
            get("POLYCRATE_BLOCK_WORKDIR"),
            Some("/workspace/blocks/app")
        );
        assert_eq!(get("POLYCRATE_ACTION"), Some("deploy"));
        assert_eq!(get("IN_CI"), Some("true"));
        assert_eq!(get("ANSIBLE_INVENTORY"), Some("/workspace/inventory.yml"));
        assert_eq!(get("ANSIBLE_HOST_KEY_CHECKING"), Some("False"));
        assert_eq!(get("ANSIBLE_STDOUT_CALLBACK"), Some("default"));
        assert_eq!(get("PYTHONUNBUFFERED"), Some("1"));
        assert_eq!(get("ANSIBLE_FORCE_COLOR"), None);
        assert_eq!(get("IN_CONTAINER"), None);
        assert_eq!(get("WORKSPACE_NAME"), Some("acme-ws"));
        assert_eq!(get("WORKSPACE_ORGANIZATION"), Some("acme"));
        assert_eq!(get("WORKSPACE_CONFIG_IMAGE_VERSION"), Some("bookworm"));
        assert_eq!(get("BLOCK_VERSION"), Some("2.0.0"));
        assert_eq!(get("BLOCK_CONFIG_DB_HOST"), Some("db.prod"));
        assert_eq!(get("BLOCK_CONFIG_DB_PORT"), Some("5432"));
        assert_eq!(
            get("BLOCK_CONFIG_DB"),
            Some(r#"{"host":"db.prod","port":5432}"#)
        );
        assert_eq!(get("BLOCK_CONFIG_TAGS"), Some(r#"["a","b"]"#));
        assert_eq!(get("BLOCK_CONFIG_WEIRD_KEY_X"), Some("1"));
        assert_eq!(get("BLOCK_CONFIG_EMPTY"), None, "nulls are left out");
        assert_eq!(get("ACTION_NAME"), Some("deploy"));
        assert_eq!(get("ACTION_PLAYBOOK"), Some("deploy.yml"));
        assert_eq!(get("EXTRA_VARS_PATCH_PROFILE"), Some("security-only"));
        assert_eq!(get("EXTRA_VARS_OPTS_DRY_RUN"), Some("true"));
        assert_eq!(
            get("EXTRA_VARS"),
            Some(r#"{"opts":{"dry-run":true,"n":null},"patch_profile":"security-only"}"#)
        );
        // extraenv comes last and wins.
        assert_eq!(get("HTTP_PROXY"), Some("http://proxy:3128"));
        assert_eq!(get("BLOCK_NAME"), Some("overridden"));
    }

    #[test]
    fn environment_without_inventory_or_extras() {
        let ws = workspace("name: acme-ws\norganization: acme\n");
        let mut p = plan(&ws, "app", "hello", &Map::new()).unwrap();
        let env = p.environment("/tmp/run");
        assert_eq!(env.get("ANSIBLE_INVENTORY"), None);
        assert_eq!(env.get("EXTRA_VARS").map(String::as_str), Some("{}"));
        assert_eq!(
            env.get("ACTION_SCRIPT").map(String::as_str),
            Some(r#"["echo one","echo two"]"#)
        );
        // Oversized and NUL-containing values are left out.
        p.vars["block"]["config"]["big"] = json!("x".repeat(MAX_ENV_VALUE_BYTES + 1));
        p.vars["block"]["config"]["nul"] = json!("a\u{0}b");
        let env = p.environment("/tmp/run");
        assert!(!env.contains_key("BLOCK_CONFIG_BIG"));
        assert!(!env.contains_key("BLOCK_CONFIG_NUL"));
        assert!(
            !env.contains_key("BLOCK_CONFIG"),
            "the whole config is oversized now"
        );
    }

    #[test]
    fn colliding_names_resolve_in_sorted_key_order() {
        let mut env = BTreeMap::new();
        let object = json!({"a_b": "flat", "a": {"b": "nested"}});
        flatten_object("X", object.as_object().unwrap(), &mut env);
        assert_eq!(env["X_A_B"], "nested", "'a' sorts before 'a_b'");
    }

    #[test]
    fn plan_round_trips_through_json_with_a_tagged_command() {
        let ws = workspace(WS);
        let p = plan(&ws, "prod", "deploy", &Map::new()).unwrap();
        let value = serde_json::to_value(&p).unwrap();
        assert_eq!(value["command"]["kind"], "playbook");
        let back: JobPlan = serde_json::from_value(value).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn plans_without_a_timeout_parse_and_carry_none() {
        let ws = workspace(WS);
        let p = plan(&ws, "prod", "hello", &Map::new()).unwrap();
        assert_eq!(p.timeout_secs, None);
        let mut value = serde_json::to_value(&p).unwrap();
        assert!(value.get("timeout_secs").is_none(), "left out when absent");
        // A plan written before timeouts existed still reads.
        value.as_object_mut().unwrap().remove("timeout_secs");
        let back: JobPlan = serde_json::from_value(value).unwrap();
        assert_eq!(back.timeout_secs, None);
    }

    #[test]
    fn join_handles_roots() {
        assert_eq!(join("/workspace", "blocks/x"), "/workspace/blocks/x");
        assert_eq!(join("/workspace/", "/blocks/x"), "/workspace/blocks/x");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/", ""), "/");
        assert_eq!(join("rel", ""), "rel");
        assert_eq!(join("", "x"), "x");
    }
}
