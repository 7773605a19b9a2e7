//! Plans of the example workspace: argv, working directory, environment and
//! vars as a runner uses them.

use muster_common::plan::{plan, JobCommand};
use serde_json::{json, Map};

use crate::example::example;

#[test]
fn patch_plan_runs_the_playbook_with_the_root_inventory() {
    let ws = example();
    let extra = json!({"patch_profile": "security-only"});
    let p = plan(&ws, "linux-patch", "patch", extra.as_object().unwrap()).unwrap();
    assert_eq!(p.workspace, "acme-corp-automation");
    assert_eq!(p.organization, "acme");
    assert_eq!(p.block_version.as_deref(), Some("0.1.0"));
    assert_eq!(p.image.as_deref(), Some("muster/ansible:bookworm"));
    assert_eq!(p.workdir, "blocks/linux-patch");
    assert_eq!(
        p.command,
        JobCommand::Playbook {
            playbook: "patch.yml".into(),
            inventory: Some("inventory.yml".into())
        }
    );
    assert_eq!(
        p.argv("/workspace", "/run/muster/vars.json"),
        [
            "ansible-playbook",
            "-i",
            "/workspace/inventory.yml",
            "patch.yml",
            "-e",
            "@/run/muster/vars.json"
        ]
    );
    assert_eq!(p.working_dir("/workspace"), "/workspace/blocks/linux-patch");
    assert_eq!(p.vars["patch_profile"], "security-only");
    assert_eq!(
        p.vars["block"]["config"]["patch_profile"], "full",
        "extra vars stay top-level"
    );
    assert_eq!(p.vars["block"]["config"]["target_hosts"], "all");
    assert_eq!(p.vars["workspace"]["name"], "acme-corp-automation");
    assert_eq!(p.vars["action"]["name"], "patch");

    let env = p.environment("/workspace");
    assert_eq!(env["ANSIBLE_INVENTORY"], "/workspace/inventory.yml");
    assert_eq!(env["BLOCK_CONFIG_TARGET_HOSTS"], "all");
    assert_eq!(env["BLOCK_CONFIG_REBOOT_AFTER_PATCH"], "false");
    assert_eq!(env["EXTRA_VARS_PATCH_PROFILE"], "security-only");
}

#[test]
fn broken_and_hello_plans() {
    let ws = example();
    let broken = plan(&ws, "linux-patch", "broken", &Map::new()).unwrap();
    assert_eq!(broken.argv("/w", "/v")[3], "broken.yml");
    let hello = plan(&ws, "linux-patch", "hello", &Map::new()).unwrap();
    let argv = hello.argv("/w", "/v");
    assert_eq!(argv[..4], ["bash", "-euo", "pipefail", "-c"]);
    assert!(
        argv[4].contains("${BLOCK_CONFIG_PATCH_PROFILE}"),
        "{}",
        argv[4]
    );
}
