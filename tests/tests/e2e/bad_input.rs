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

/// Whatever the API refuses, it refuses as `{"detail": …}` naming what was
/// wrong: axum's own refusals too (a query string it cannot read, a method a
/// path does not serve), and text no store may hold. Each of these once
/// answered otherwise, or with a 500; schemathesis found them
/// (tests/tests/e2e/openapi.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_json_naming_what_was_wrong() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    c.push_dir(&c.admin_key, &example_workspace()).await?;
    let key = &c.admin_key;
    let get = |path: &'static str| c.call(key, reqwest::Method::GET, path, None);
    let post = |path: &'static str, body| c.call(key, reqwest::Method::POST, path, Some(body));
    let detail = |body: &serde_json::Value| body["detail"].as_str().unwrap_or_default().to_owned();
    let trigger = "/api/v1/workspaces/acme-corp-automation/actions";

    // Refused by axum itself: a repeated query parameter, a method.
    let (status, body) = get("/api/v1/action-runs/?status=queued&status=failed").await?;
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("status"), "{body}");
    let response = c
        .http
        .put(c.url("/api/v1/action-runs/"))
        .bearer_auth(key)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 405);
    let allow = response.headers().get("allow").cloned();
    assert_eq!(
        allow.as_ref().and_then(|v| v.to_str().ok()),
        Some("GET,HEAD")
    );
    let body: serde_json::Value = response.json().await?;
    assert!(detail(&body).contains("Allow"), "{body}");

    // NUL characters: in a filter, a name, a trigger's reason and variables.
    let (status, body) = get("/api/v1/action-runs/?action=a%00b").await?;
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).starts_with("action: "), "{body}");
    let (status, body) = get("/api/v1/workspaces/a%00b/").await?;
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).starts_with("name: "), "{body}");
    let (status, body) = post(
        trigger,
        json!({"block": "linux-patch", "action": "patch", "reason": "a\u{0}b"}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).starts_with("reason: "), "{body}");
    let (status, body) = post(
        trigger,
        json!({"block": "linux-patch", "action": "patch",
               "parameters": {"extra_vars": {"hosts": ["web1", "x\u{0}"]}}}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        detail(&body).starts_with("parameters.extra_vars.hosts[1]: "),
        "{body}"
    );

    // In a pushed workspace (YAML spells it "\0"), where only the database
    // minds it: still the client's error, never a 500.
    let file = tar::EntryType::Regular;
    let (status, body) = c
        .push_bytes(
            key,
            raw_tar_gz(&[(
                "workspace.poly",
                file,
                b"name: tiny\norganization: acme\ndescription: \"a\\0b\"\n",
                None,
            )]),
        )
        .await?;
    assert!(status == 400 || status == 422, "{status} {body}");

    // A join token's body is read like every other: a wrong type names the
    // field; `null` asks for the defaults.
    let tokens = "/api/v1/runners/join-tokens/";
    let (status, body) = post(tokens, json!({"expires_in": "soon"})).await?;
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("expires_in"), "{body}");
    let (status, body) = post(tokens, serde_json::Value::Null).await?;
    assert_eq!(status, 201, "{body}");

    // An object written as the array of its fields in order, which serde
    // reads (schemathesis sent a check result's `"tls": [null, null]`), is
    // refused like any other wrong type, naming where.
    let (status, body) = post("/api/v1/organizations/", json!(["acme"])).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        detail(&body),
        "invalid JSON body: body: expected an object, found an array"
    );
    let (status, body) = post(
        trigger,
        json!({"block": "linux-patch", "action": "patch",
               "parameters": [null, {}, null, null, null]}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        detail(&body).contains("parameters: expected an object"),
        "{body}"
    );

    // `after_seq` is checked when `Last-Event-ID` is given too.
    let run = c
        .trigger(
            "acme-corp-automation",
            json!({"block": "linux-patch", "action": "patch",
                   "parameters": {"extra_vars": {"edge": 1.797_693_134_862_315_5e308}}}),
        )
        .await?;
    let response = c
        .http
        .get(c.url(&format!("/api/v1/action-runs/{run}/logs/?after_seq=x")))
        .bearer_auth(key)
        .header("Last-Event-ID", "0")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    assert!(response.text().await?.contains("after_seq"));

    // A number at the edge of f64 is stored and read back, in the run and
    // in the list, which once failed on it for good.
    let read = c
        .admin(
            reqwest::Method::GET,
            &format!("/api/v1/action-runs/{run}/"),
            None,
        )
        .await?;
    assert_eq!(
        read["parameters"]["extra_vars"]["edge"],
        json!(1.797_693_134_862_315_5e308),
        "{read}"
    );
    let list = c
        .admin(reqwest::Method::GET, "/api/v1/action-runs/", None)
        .await?;
    assert_eq!(list["count"], 1, "{list}");

    c.stop().await;
    db.drop_db().await;
    Ok(())
}
