//! Property tests of the `.poly` parsers: whatever the text, loading a
//! workspace returns a value or an error, never a panic, and what loads
//! survives the JSON round trip the coordinator relies on.

use muster_common::bundle::{Bundle, Entry};
use muster_common::workspace::{load, LoadedWorkspace, WorkspaceError};
use proptest::prelude::*;
use serde_yaml_ng::{Mapping, Value as Yaml};

const WORKSPACE: &str = "name: acme-ws\norganization: acme\nblocks:\n  - name: prod\n    from: app\n    config: {a: {b: 1}}\nworkflows:\n  - name: nightly\n    steps:\n      - {name: one, block: prod, action: deploy}\n";
const BLOCK: &str = "name: app\nversion: 1.0.0\nconfig:\n  a: {b: 0, c: 2}\nactions:\n  - name: deploy\n    playbook: deploy.yml\n  - name: hello\n    script: [echo hi]\n";

fn bundle_with(workspace: &str, block: &str) -> Bundle {
    let files = [
        ("workspace.poly", workspace.as_bytes()),
        ("blocks/app/block.poly", block.as_bytes()),
        ("blocks/app/deploy.yml", b"- hosts: all\n".as_slice()),
        ("inventory.yml", b"all: {}\n".as_slice()),
    ];
    Bundle::from_entries(files.iter().map(|(p, d)| {
        (
            p.to_string(),
            Entry::File {
                data: d.to_vec(),
                executable: false,
            },
        )
    }))
    .unwrap()
}

/// Loads and, when that works, checks the JSON round trip; errors must
/// still name a file.
fn check(workspace: &str, block: &str) -> Result<(), TestCaseError> {
    match load(&bundle_with(workspace, block)) {
        Ok(ws) => {
            let json = serde_json::to_string(&ws).unwrap();
            let back: LoadedWorkspace = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, ws);
        }
        Err(WorkspaceError::MissingWorkspace) => prop_assert!(false, "workspace.poly is present"),
        Err(err) => {
            let text = err.to_string();
            prop_assert!(
                text.starts_with("workspace.poly") || text.starts_with("blocks/app/block.poly"),
                "error names no file: {}",
                text
            );
        }
    }
    Ok(())
}

#[test]
fn the_fixtures_load() {
    let ws = load(&bundle_with(WORKSPACE, BLOCK)).unwrap();
    assert_eq!(
        ws.block("prod").unwrap().config["a"],
        serde_json::json!({"b": 1, "c": 2})
    );
}

/// Words that steer generated documents into the parser's interesting paths.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "name", "organization", "blocks", "from", "config", "actions", "playbook",
            "script", "version", "workflows", "steps", "block", "action", "labels",
            "extraenv", "extramounts", "image", "reference", "allow_failure", "kind",
            "description", "app", "prod", "deploy", "hello", "acme", "deploy.yml",
            "1.0.0", "latest", "host.tld/x/app:1.0.0", "host.tld/x/app", "../x", "/abs",
        ])
        .prop_map(str::to_owned),
        1 => "[a-zA-Z0-9/_.:-]{0,10}",
    ]
}

fn yaml() -> impl Strategy<Value = Yaml> {
    let leaf = prop_oneof![
        Just(Yaml::Null),
        any::<bool>().prop_map(Yaml::Bool),
        any::<i64>().prop_map(|n| Yaml::Number(n.into())),
        any::<f64>().prop_map(|n| Yaml::Number(n.into())),
        word().prop_map(Yaml::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Yaml::Sequence),
            prop::collection::vec((word(), inner), 0..6).prop_map(|entries| {
                let mut map = Mapping::new();
                for (k, v) in entries {
                    map.insert(Yaml::String(k), v);
                }
                Yaml::Mapping(map)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
        check(&text, BLOCK)?;
        check(WORKSPACE, &text)?;
    }

    #[test]
    fn yaml_ish_text_never_panics(text in "[a-z:{}\\[\\],&*!|>#'\" \n.0-9<-]{0,300}") {
        check(&text, BLOCK)?;
        check(WORKSPACE, &text)?;
    }

    #[test]
    fn generated_documents_never_panic(doc in yaml(), as_block in any::<bool>()) {
        let text = serde_yaml_ng::to_string(&doc).unwrap();
        if as_block {
            check(WORKSPACE, &text)?;
        } else {
            check(&text, BLOCK)?;
        }
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..6),
        delete in any::<bool>(),
        which in any::<bool>(),
    ) {
        let mut chars: Vec<char> = if which { WORKSPACE } else { BLOCK }.chars().collect();
        for (at, c) in &edits {
            let i = at.index(chars.len());
            if delete { chars.remove(i); } else { chars.insert(i, *c); }
        }
        let text: String = chars.into_iter().collect();
        if which { check(&text, BLOCK)?; } else { check(WORKSPACE, &text)?; }
    }
}
