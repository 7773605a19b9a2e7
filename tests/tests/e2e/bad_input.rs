//! Bad input gets a clear answer that names what was wrong and where.

use std::io::Write;

use muster_tests::{example_workspace, TestCoordinator, TestDb};
use serde_json::json;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A tar.gz whose entries are written with raw names, as a hostile client could.
fn raw_tar_gz(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    gzip(&out)
}

const WS: &[u8] = b"name: tiny\norganization: default\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bundles_are_refused_naming_the_problem() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start_with(&db, |config| config.max_bundle_mib = 1).await?;
    let key = c.admin_key.clone();

    let (status, body) = c
        .push_bytes(&key, b"this is not an archive".to_vec())
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("gzip"), "{body}");

    let (status, body) = c
        .push_bytes(&key, gzip(b"gzip, but not a tar archive at all"))
        .await?;
    assert_eq!(status, 400, "{body}");

    let file = tar::EntryType::Regular;
    for (name, kind, link) in [
        ("../x", file, None),
        ("/etc/passwd", file, None),
        ("blocks/../../x", file, None),
        ("escape", tar::EntryType::Symlink, Some("../../etc/shadow")),
        ("abs-link", tar::EntryType::Symlink, Some("/etc/shadow")),
    ] {
        let archive = raw_tar_gz(&[("workspace.poly", file, WS, None), (name, kind, b"x", link)]);
        let (status, body) = c.push_bytes(&key, archive).await?;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(name),
            "the error should name '{name}': {body}"
        );
    }

    let big = vec![b'a'; 2 * 1024 * 1024];
    let (status, body) = c.push_bytes(&key, big).await?;
    assert_eq!(status, 413, "{body}");

    let (status, body) = c
        .push_bytes(
            &key,
            raw_tar_gz(&[(
                "workspace.poly",
                file,
                b"name: [unclosed\norganization: x\n",
                None,
            )]),
        )
        .await?;
    assert_eq!(status, 422, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("workspace.poly") && detail.contains("line"),
        "{body}"
    );

    let bad_block = b"name: broken\nversion: 0.1.0\nactions:\n  - name: both\n    playbook: a.yml\n    script: [\"true\"]\n";
    let (status, body) = c
        .push_bytes(
            &key,
            raw_tar_gz(&[
                ("workspace.poly", file, WS, None),
                ("blocks/broken/block.poly", file, bad_block, None),
            ]),
        )
        .await?;
    assert_eq!(status, 422, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("blocks/broken/block.poly:") && detail.contains("playbook"),
        "{body}"
    );

    c.stop().await;
    db.drop_db().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_triggers_are_refused_naming_the_problem() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    c.push_dir(&c.admin_key, &example_workspace()).await?;
    let path = "/api/v1/workspaces/acme-corp-automation/actions";
    let post =
        |body: serde_json::Value| c.call(&c.admin_key, reqwest::Method::POST, path, Some(body));

    let (status, body) = post(json!({"block": "nope", "action": "patch"})).await?;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) = post(json!({"block": "linux-patch", "action": "nope"})).await?;
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) =
        post(json!({"block": "linux-patch", "action": "patch", "parameters": {"extra_vars": [1]}}))
            .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("extra_vars"),
        "{body}"
    );
    let (status, body) = post(json!({"action": "patch"})).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("block"), "{body}");

    let response = c
        .http
        .post(c.url(path))
        .bearer_auth(&c.admin_key)
        .header("Content-Type", "application/json")
        .body("{\"block\": \"linux-patch\",")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    assert!(response.text().await?.contains("invalid JSON"));

    let (status, _) = c
        .call(
            &c.admin_key,
            reqwest::Method::POST,
            "/api/v1/workspaces/missing/actions",
            Some(json!({"block": "a", "action": "b"})),
        )
        .await?;
    assert_eq!(status, 404);
    let (status, body) = c
        .call(
            &c.admin_key,
            reqwest::Method::GET,
            "/api/v1/action-runs/?status=bogus",
            None,
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    let (status, _) = c
        .call(
            &c.admin_key,
            reqwest::Method::GET,
            "/api/v1/action-runs/not-a-uuid/",
            None,
        )
        .await?;
    assert_eq!(status, 404);

    c.stop().await;
    db.drop_db().await;
    Ok(())
}
