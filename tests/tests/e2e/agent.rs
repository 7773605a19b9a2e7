//! The monitoring agent (the built `muster-agent`) against the real
//! coordinator and real servers the test runs on loopback: an HTTP server, a
//! TLS server whose certificate expires in two days, a TCP port, ICMP to
//! 127.0.0.1 and a DNS server. The coordinator shows each endpoint's state,
//! phase timings and certificate expiry; a server that stops gives one alert
//! and, when it returns, one resolve; a coordinator away for two minutes
//! leaves no gap in the history; two agents in two sites (network
//! namespaces the test makes) need a quorum to call an endpoint down.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use muster_agent::dns::{flags, Message, RData, Record, CLASS_IN};
use muster_tests::monitoring::WebhookReceiver;
use muster_tests::{built_binary, wait_until, CoordinatorProcess, TestCoordinator, TestDb};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A `muster-agent` process of the test's own.
struct AgentProcess {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts the agent in the calling thread's network namespace (a child
    /// inherits it); needs a Tokio runtime entered.
    fn start(coordinator: &str, token: &str, location: &str) -> anyhow::Result<AgentProcess> {
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = tokio::process::Command::new(built_binary("muster-agent")?)
            .args(["--coordinator", coordinator, "--location", location])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            // From the environment, so the token is on no command line.
            .env("MUSTER_AGENT_TOKEN", token)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting muster-agent")?;
        Ok(AgentProcess { child, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// An HTTP server answering `GET /` with `{"status": "UP"}`, stoppable and
/// startable again on its port.
struct HttpServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HttpServer {
    async fn start(addr: SocketAddr) -> anyhow::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|| async { axum::Json(json!({"status": "UP"})) }),
        );
        let shutdown = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        Ok(HttpServer {
            addr,
            stop,
            task: Some(task),
        })
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A TLS server on loopback whose self-signed certificate expires in two
/// days; it answers every request `200 ok`.
async fn tls_server() -> anyhow::Result<SocketAddr> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A TCP port that accepts connections.
async fn tcp_server() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    Ok(addr)
}

/// A DNS server answering `ok.test` A 192.0.2.7 and NXDOMAIN to anything else.
async fn dns_server() -> anyhow::Result<SocketAddr> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::decode(&buf[..n]) else {
                continue;
            };
            let Some(question) = query.questions.first() else {
                continue;
            };
            let mut answer = query.clone();
            answer.flags |= flags::QR | flags::RA | flags::AA;
            if question.name == "ok.test" {
                answer.answers = vec![Record {
                    name: question.name.clone(),
                    rtype: 1,
                    class: CLASS_IN,
                    ttl: 60,
                    data: RData::A(Ipv4Addr::new(192, 0, 2, 7)),
                }];
            } else {
                answer.flags |= 3; // NXDOMAIN
            }
            if let Ok(bytes) = answer.encode() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    Ok(addr)
}

fn endpoint(name: &str, kind: &str, target: &str, conditions: Value, extra: Value) -> Value {
    let mut body = json!({
        "name": name, "kind": kind, "target": target,
        "interval": 1, "timeout": 1, "locations": ["site-a"],
        "min_failing_locations": 1, "failure_threshold": 2, "success_threshold": 1,
        "conditions": conditions,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

/// The one location's last result of an endpoint record.
fn last_result(endpoint: &Value) -> &Value {
    &endpoint["location_states"][0]["last_result"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_checks_real_servers_and_a_stopped_one_alerts_once() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let webhook = WebhookReceiver::start(0).await?;
    webhook.register(&c, &c.admin_key).await?;

    let mut http = HttpServer::start("127.0.0.1:0".parse()?).await?;
    let tls = tls_server().await?;
    let tcp = tcp_server().await?;
    let dns = dns_server().await?;
    let web = c
        .create_endpoint(endpoint(
            "web",
            "http",
            &format!("http://{}/", http.addr),
            json!([
                "[STATUS] == 200",
                "[BODY].status == UP",
                "[RESPONSE_TIME] < 2000"
            ]),
            json!({}),
        ))
        .await?;
    let secure = c
        .create_endpoint(endpoint(
            "secure",
            "http",
            &format!("https://{tls}/"),
            json!([
                "[STATUS] == 200",
                "[CERTIFICATE_EXPIRATION] > 24h",
                {"condition": "[CERTIFICATE_EXPIRATION] > 72h", "degrades": true},
            ]),
            json!({"http": {"insecure_tls": true}}),
        ))
        .await?;
    let port = c
        .create_endpoint(endpoint(
            "port",
            "tcp",
            &tcp.to_string(),
            json!(["[CONNECTED] == true"]),
            json!({}),
        ))
        .await?;
    let ping = c
        .create_endpoint(endpoint(
            "ping",
            "icmp",
            "127.0.0.1",
            json!(["[CONNECTED] == true", "[PACKET_LOSS] == 0"]),
            json!({"icmp": {"count": 2}}),
        ))
        .await?;
    let name = c
        .create_endpoint(endpoint(
            "name",
            "dns",
            &dns.to_string(),
            json!(["[DNS_RCODE] == NOERROR"]),
            json!({"dns": {"name": "ok.test", "query_type": "A", "expected": "192.0.2.7"}}),
        ))
        .await?;

    let agent = c.create_agent("edge-1", "site-a").await?;
    let process = AgentProcess::start(
        &format!("http://{}", c.coordinator.http_addr),
        &agent.token,
        "site-a",
    )?;
    let context = || process.log();

    let web_up = c.wait_status(&web, "up").await.with_context(context)?;
    let timings = &last_result(&web_up)["timings"];
    for phase in ["connect_ms", "first_byte_ms", "total_ms"] {
        assert!(timings[phase].as_f64().is_some(), "{phase}: {web_up}");
    }
    // Over TLS every phase, and the expiry: two days, so degraded (> 72h
    // only degrades), not down.
    let secure_state = c
        .wait_status(&secure, "degraded")
        .await
        .with_context(context)?;
    let timings = &last_result(&secure_state)["timings"];
    for phase in ["connect_ms", "tls_ms", "first_byte_ms", "total_ms"] {
        assert!(timings[phase].as_f64().is_some(), "{phase}: {secure_state}");
    }
    let expires = secure_state["location_states"][0]["certificate_expires_at"]
        .as_str()
        .context("certificate_expires_at")?;
    let left = chrono::DateTime::parse_from_rfc3339(expires)?.with_timezone(&chrono::Utc)
        - chrono::Utc::now();
    assert!(
        left > chrono::Duration::hours(47) && left <= chrono::Duration::hours(48),
        "the certificate expires in two days, not {left}"
    );
    c.wait_status(&port, "up").await.with_context(context)?;
    let ping_up = c.wait_status(&ping, "up").await.with_context(context)?;
    assert_eq!(
        last_result(&ping_up)["measured"]["packet_loss_percent"],
        0.0
    );
    let name_up = c.wait_status(&name, "up").await.with_context(context)?;
    assert_eq!(last_result(&name_up)["measured"]["dns_rcode"], "NOERROR");

    // The HTTP server stops: down after two failures, one alert.
    http.stop().await;
    let down = c.wait_status(&web, "down").await.with_context(context)?;
    assert!(last_result(&down)["error"].is_string(), "{down}");
    webhook.wait_for("endpoint_down", 1).await?;
    // It returns on its port: up, one resolve.
    let mut http = HttpServer::start(http.addr).await?;
    c.wait_status(&web, "up").await.with_context(context)?;
    webhook.wait_for("endpoint_resolved", 1).await?;
    // Checks go on; nothing more is said about this incident.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        webhook.count("endpoint_down"),
        1,
        "{:?}",
        webhook.received()
    );
    assert_eq!(
        webhook.count("endpoint_resolved"),
        1,
        "{:?}",
        webhook.received()
    );

    http.stop().await;
    process.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}

/// The coordinator's admin key in a data directory.
fn admin_key(data_dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(data_dir.join("admin-api-key"))?
        .trim()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_has_no_gap_for_two_minutes_without_the_coordinator() -> anyhow::Result<()> {
    const AWAY: Duration = Duration::from_secs(120);
    let db = TestDb::create().await?;
    let data_dir = tempfile::tempdir()?;
    let mut coordinator = CoordinatorProcess::start(&db.url, data_dir.path(), &[]).await?;
    let key = admin_key(data_dir.path())?;
    // Restarted, it answers on the same address.
    let base = coordinator.url();
    let api = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = api
            .request(method, format!("{base}{path}"))
            .bearer_auth(&key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    let http = HttpServer::start("127.0.0.1:0".parse()?).await?;
    let created: Value = call(
        reqwest::Method::POST,
        "/api/v1/endpoints/",
        Some(endpoint(
            "web",
            "http",
            &format!("http://{}/", http.addr),
            json!(["[STATUS] == 200"]),
            json!({}),
        )),
    )
    .await?
    .json()
    .await?;
    let web = created["id"].as_str().context("endpoint id")?.to_owned();
    let agent: Value = call(
        reqwest::Method::POST,
        "/api/v1/agents/",
        Some(json!({"name": "edge-1", "location": "site-a"})),
    )
    .await?
    .json()
    .await?;
    let process = AgentProcess::start(
        &base,
        agent["token"].as_str().context("agent token")?,
        "site-a",
    )?;
    let results = |query: String| {
        let request = api
            .get(format!("{base}/api/v1/endpoints/{web}/results/?{query}"))
            .bearer_auth(&key)
            .send();
        async move { anyhow::Ok(request.await?.json::<Value>().await?) }
    };
    wait_until(Duration::from_secs(15), "the first results", || async {
        Ok(results("page_size=1".into()).await?["count"].as_u64() > Some(2))
    })
    .await
    .with_context(|| process.log())?;

    coordinator.kill().await?;
    let left = chrono::Utc::now();
    tokio::time::sleep(AWAY).await;
    let back = chrono::Utc::now();
    coordinator.restart().await?;

    // The agent delivers what it checked meanwhile, with the times it checked.
    let since = left.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let until = back.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let query = format!("since={since}&until={until}&page_size=500");
    let expected = (AWAY.as_secs() - 5) as usize;
    wait_until(Duration::from_secs(60), "the buffered results", || async {
        Ok(results(query.clone()).await?["results"]
            .as_array()
            .map_or(0, Vec::len)
            >= expected)
    })
    .await
    .with_context(|| process.log())?;
    let page = results(query).await?;
    let mut times: Vec<chrono::DateTime<chrono::Utc>> = page["results"]
        .as_array()
        .context("results")?
        .iter()
        .filter_map(|r| r["checked_at"].as_str())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .collect();
    times.sort();
    let widest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "coordinator away {} s: {} results from that time, widest gap {} ms",
        AWAY.as_secs(),
        times.len(),
        widest.num_milliseconds()
    );
    assert!(
        widest < chrono::Duration::seconds(3),
        "a gap of {widest} in the history while the coordinator was away"
    );
    let first = times.first().copied().context("no results")?;
    let last = times.last().copied().context("no results")?;
    assert!(
        first - left < chrono::Duration::seconds(3),
        "{first} vs {left}"
    );
    assert!(
        back - last < chrono::Duration::seconds(3),
        "{last} vs {back}"
    );

    process.stop().await;
    coordinator.kill().await?;
    db.drop_db().await;
    Ok(())
}

/// An HTTP server on a listener it is given, answering `GET /` with 200 while
/// `healthy` is set and 503 otherwise, counting the requests it gets.
struct SwitchableServer {
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl SwitchableServer {
    fn serve(listener: std::net::TcpListener) -> anyhow::Result<SwitchableServer> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let healthy = Arc::new(AtomicBool::new(true));
        let hits = Arc::new(AtomicUsize::new(0));
        let (h, n) = (healthy.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                n.fetch_add(1, Ordering::Relaxed);
                let ok = h.load(Ordering::Relaxed);
                async move {
                    if ok {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        );
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        Ok(SwitchableServer {
            healthy,
            hits,
            stop,
        })
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for SwitchableServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs `f` on a thread of its own in a fresh network namespace with its
/// loopback up: another site, whose 127.0.0.1 is not the host's. Sockets
/// bound and processes started there stay in that namespace after the
/// thread ends (the test runs as root; `ip` comes from iproute2, installed
/// by scripts/test-env.sh).
fn in_another_site<T: Send>(f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("a network namespace of the test's own (the test runs as root)")?;
                let up = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .context("ip (iproute2, installed by scripts/test-env.sh)")?;
                anyhow::ensure!(up.success(), "ip link set lo up: {up}");
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace's thread panicked"))?
    })
}

/// Forwards every connection accepted on `listener` (in another site) to
/// `to` (on the host): the one way out of that site, to the coordinator.
fn forward(listener: std::net::TcpListener, to: SocketAddr) -> anyhow::Result<CancellationToken> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = tokio::select! {
                _ = stopped.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            let stopped = stopped.clone();
            tokio::spawn(async move {
                // Connected from a runtime thread: in the host's namespace.
                let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = stopped.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    });
    Ok(stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_in_two_sites_need_a_quorum_to_call_an_endpoint_down() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = TestCoordinator::start(&db).await?;
    let webhook = WebhookReceiver::start(0).await?;
    webhook.register(&c, &c.admin_key).await?;
    let berlin = c.create_agent("berlin", "site-a").await?;
    let paris = c.create_agent("paris", "site-b").await?;

    // The same target, http://127.0.0.1:<port>/, is a different server in
    // each site: site-a is the host, site-b a namespace of its own.
    let host = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = host.local_addr()?.port();
    let server_a = SwitchableServer::serve(host)?;
    let runtime = tokio::runtime::Handle::current();
    let (server_b, exit, agent_b) = in_another_site(|| {
        let server = std::net::TcpListener::bind(("127.0.0.1", port))?;
        let exit = std::net::TcpListener::bind("127.0.0.1:0")?;
        let coordinator = format!("http://{}", exit.local_addr()?);
        let _runtime = runtime.enter();
        let agent = AgentProcess::start(&coordinator, &paris.token, "site-b")?;
        Ok((server, exit, agent))
    })?;
    let server_b = SwitchableServer::serve(server_b)?;
    let forwarding = forward(exit, c.coordinator.http_addr)?;
    let agent_a = AgentProcess::start(
        &format!("http://{}", c.coordinator.http_addr),
        &berlin.token,
        "site-a",
    )?;
    let context = || format!("site-a:\n{}\nsite-b:\n{}", agent_a.log(), agent_b.log());

    let web = c
        .create_endpoint(endpoint(
            "web",
            "http",
            &format!("http://127.0.0.1:{port}/"),
            json!(["[STATUS] == 200"]),
            json!({"locations": ["site-a", "site-b"], "min_failing_locations": 2}),
        ))
        .await?;
    let states = |endpoint: &Value| -> Vec<(String, String)> {
        endpoint["location_states"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["location"].as_str()?.into(), s["state"].as_str()?.into())))
            .collect()
    };
    let pair = |a: &str, b: &str| {
        vec![
            ("site-a".to_owned(), a.to_owned()),
            ("site-b".to_owned(), b.to_owned()),
        ]
    };

    let up = c.wait_status(&web, "up").await.with_context(context)?;
    wait_until(Duration::from_secs(15), "both sites up", || async {
        Ok(states(&c.endpoint(&web).await?) == pair("up", "up"))
    })
    .await
    .with_context(|| format!("{up}\n{}", context()))?;
    // Each site's agent checked its own server.
    assert!(
        server_a.hits() > 0 && server_b.hits() > 0,
        "{} {}",
        server_a.hits(),
        server_b.hits()
    );

    // One site fails: degraded, and nobody is told.
    server_a.set_healthy(false);
    let degraded = c
        .wait_status(&web, "degraded")
        .await
        .with_context(context)?;
    assert_eq!(states(&degraded), pair("down", "up"), "{degraded}");
    assert!(degraded["incident"].is_null(), "{degraded}");

    // Both fail: down, one alert.
    server_b.set_healthy(false);
    let down = c.wait_status(&web, "down").await.with_context(context)?;
    assert_eq!(states(&down), pair("down", "down"), "{down}");
    webhook.wait_for("endpoint_down", 1).await?;
    assert_eq!(webhook.received().len(), 1, "{:?}", webhook.received());

    // Both recover: up, one resolve.
    server_a.set_healthy(true);
    server_b.set_healthy(true);
    c.wait_status(&web, "up").await.with_context(context)?;
    webhook.wait_for("endpoint_resolved", 1).await?;
    assert_eq!(
        webhook.count("endpoint_down"),
        1,
        "{:?}",
        webhook.received()
    );

    forwarding.cancel();
    agent_a.stop().await;
    agent_b.stop().await;
    c.stop().await;
    db.drop_db().await;
    Ok(())
}
