//! The example workspace under `examples/acme-corp-automation`, loaded from
//! disk as the CLI would push it, and its script action run for real.

use std::path::PathBuf;
use std::process::Command;

use muster_common::bundle::{Bundle, Limits};
use muster_common::plan::plan;
use muster_common::workspace::{load, ActionKind, LoadedWorkspace};
use serde_json::{json, Map};

fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/acme-corp-automation")
}

pub fn example_bundle() -> Bundle {
    Bundle::from_dir(&example_dir()).unwrap()
}

pub fn example() -> LoadedWorkspace {
    load(&example_bundle()).unwrap()
}

#[test]
fn loads_with_merged_config_actions_and_inventory() {
    let ws = example();
    assert_eq!(ws.workspace.name, "acme-corp-automation");
    assert_eq!(ws.workspace.organization, "acme");
    assert!(ws.workspace.description.is_some());
    let image = ws.workspace.config.image.as_ref().unwrap();
    assert_eq!(image.reference.as_deref(), Some("muster/ansible"));
    assert_eq!(image.version.as_deref(), Some("bookworm"));

    let names: Vec<&str> = ws.blocks.keys().map(String::as_str).collect();
    assert_eq!(names, ["linux-patch"]);
    let block = ws.block("linux-patch").unwrap();
    assert_eq!(block.dir, "blocks/linux-patch");
    assert_eq!(block.version.as_deref(), Some("0.1.0"));
    assert_eq!(block.kind.as_deref(), Some("linuxapp"));
    assert_eq!(
        block.config,
        json!({"patch_profile": "full", "reboot_after_patch": false, "target_hosts": "all"})
    );
    assert_eq!(block.inventory.as_deref(), Some("inventory.yml"));
    let actions: Vec<&str> = block.actions.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(actions, ["patch", "broken", "hello"]);
    assert_eq!(
        block.action("patch").unwrap().kind,
        ActionKind::Playbook("patch.yml".into())
    );
    assert_eq!(
        block.action("broken").unwrap().kind,
        ActionKind::Playbook("broken.yml".into())
    );
    assert!(matches!(
        block.action("hello").unwrap().kind,
        ActionKind::Script(_)
    ));
}

#[test]
fn bundle_digest_is_stable_across_the_archive() {
    let bundle = example_bundle();
    assert_eq!(bundle.digest(), example_bundle().digest());
    let back = Bundle::from_tar_gz(&bundle.to_tar_gz(), &Limits::default()).unwrap();
    assert_eq!(back.digest(), bundle.digest());
    assert_eq!(load(&back).unwrap(), example());
}

#[test]
fn hello_runs_under_bash_with_the_planned_environment() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("workspace");
    std::fs::create_dir(&root).unwrap();
    example_bundle().unpack_into(&root).unwrap();
    let root = root.to_str().unwrap();

    let p = plan(&example(), "linux-patch", "hello", &Map::new()).unwrap();
    let argv = p.argv(root, &format!("{root}/../vars.json"));
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(p.working_dir(root))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(p.environment(root))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains(&format!("Hello from block linux-patch in workspace {root}")),
        "{stdout}"
    );
    assert!(stdout.contains("Patch profile is full"), "{stdout}");
    assert!(
        stdout.contains(&format!("Working directory is {root}/blocks/linux-patch")),
        "{stdout}"
    );
}
