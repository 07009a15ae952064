//! HTTPS: `serve --tls-cert/--tls-key/--tls-client-ca` with a CA, a server certificate and
//! client certificates generated here; the CLI and a `cloudai worker` process reach it with
//! `--ca-cert/--client-cert/--client-key`; clients without a trusted chain or without a client
//! certificate are refused; the local worker of an HTTPS host joins over its loopback
//! listener; plain HTTP on a reachable address is refused unless asked for.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use reqwest::Method;
use serde_json::{Value, json};

use crate::execution::{IMAGE, docker_ready};
use crate::harness::{ALICE_TOKEN, StoreKind, TestHost, binary, run_within};

/// A CA and the certificates it issued, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `ca.pem` issues `server.pem` (localhost, 127.0.0.1) and `client.pem`; `stranger-ca.pem`
    /// issues `stranger.pem`, a client certificate the host does not trust.
    fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir };
        let ca = Self::ca("CloudAI test CA");
        pki.write("ca.pem", &ca.pem());
        pki.leaf(
            &ca,
            "server",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki.leaf(
            &ca,
            "client",
            vec!["worker-1.example".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let stranger = Self::ca("Some other CA");
        pki.write("stranger-ca.pem", &stranger.pem());
        pki.leaf(
            &stranger,
            "stranger",
            vec!["stranger.example".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        pki
    }

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(
        &self,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        name: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let certificate = params.signed_by(&key, issuer).unwrap();
        self.write(&format!("{name}.pem"), &certificate.pem());
        self.write(&format!("{name}.key"), &key.serialize_pem());
    }

    fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.path(name), contents).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn pem(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// A client trusting `ca` (none: the public roots only), presenting `identity` (a
    /// certificate/key pair by file stem) if any.
    fn client(&self, ca: Option<&str>, identity: Option<&str>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if let Some(ca) = ca {
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(&self.pem(ca)).unwrap());
        }
        if let Some(stem) = identity {
            let mut pem = self.pem(&format!("{stem}.pem"));
            pem.extend(self.pem(&format!("{stem}.key")));
            builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        builder.build().unwrap()
    }

    /// `serve` flags for HTTPS, requiring client certificates from `ca.pem`.
    fn serve_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.arg("server.pem"),
            "--tls-key".into(),
            self.arg("server.key"),
            "--tls-client-ca".into(),
            self.arg("ca.pem"),
        ]
    }

    /// Client flags that the host accepts.
    fn client_flags(&self) -> Vec<String> {
        vec![
            "--ca-cert".into(),
            self.arg("ca.pem"),
            "--client-cert".into(),
            self.arg("client.pem"),
            "--client-key".into(),
            self.arg("client.key"),
        ]
    }
}

fn start_https(pki: &Pki, extra: &[&str]) -> TestHost {
    let mut flags = pki.serve_flags();
    flags.extend(extra.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut host = TestHost::start_with(StoreKind::Embedded, &flags).expect("host starts");
    assert!(
        host.url.starts_with("https://127.0.0.1:"),
        "the host says it serves {}",
        host.url
    );
    host.use_client(pki.client(Some("ca.pem"), Some("client")));
    host
}

/// The full error chain of a failed request (reqwest's own Display names only its URL).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `cloudai ARGS...` against `host` with `flags` before the command's own arguments.
fn cli(host: &TestHost, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env("CLOUDAI_HOST", &host.url)
        .env("CLOUDAI_TOKEN", ALICE_TOKEN)
        .env_remove("CLOUDAI_CA_CERT")
        .env_remove("CLOUDAI_CLIENT_CERT")
        .env_remove("CLOUDAI_CLIENT_KEY");
    run_within(
        &format!("cloudai {args:?}"),
        &mut command,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}\nhost log:\n{}", host.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_host_with_client_certificates_serves_trusted_clients_and_refuses_the_rest() {
    let pki = Pki::generate();
    let host = start_https(&pki, &["--no-local-worker"]);
    let tasks = format!("{}/v1/tasks", host.url);

    // A client trusting the CA and presenting a certificate it issued is served.
    let (status, body) = host
        .call(Method::GET, "/v1/tasks", Some(ALICE_TOKEN), None, &[])
        .await;
    assert_eq!(status, 200, "{body}");
    // Still a token per request: the certificate alone is not an identity.
    let (status, body) = host.call(Method::GET, "/v1/tasks", None, None, &[]).await;
    assert_eq!(status, 401, "{body}");

    // Refused: no client certificate; one from another CA; a client that does not trust the
    // host's CA; plain HTTP on the HTTPS port.
    for (what, client, url) in [
        (
            "without a client certificate",
            pki.client(Some("ca.pem"), None),
            tasks.clone(),
        ),
        (
            "with a client certificate from another CA",
            pki.client(Some("ca.pem"), Some("stranger")),
            tasks.clone(),
        ),
        (
            "without trusting the host's CA",
            pki.client(None, Some("client")),
            tasks.clone(),
        ),
        (
            "in plain HTTP",
            pki.client(None, None),
            tasks.replacen("https://", "http://", 1),
        ),
    ] {
        let answer = client.get(&url).bearer_auth(ALICE_TOKEN).send().await;
        match answer {
            Err(error) => {
                if what == "without trusting the host's CA" {
                    let why = chain(&error);
                    assert!(
                        why.contains("certificate"),
                        "the refusal {what} should name the certificate: {why}"
                    );
                }
            }
            Ok(response) => panic!(
                "a request {what} was answered {}: {:?}",
                response.status(),
                response.text().await
            ),
        }
    }

    // The CLI with --ca-cert and a client certificate.
    let flags = pki.client_flags();
    let mut args: Vec<&str> = vec!["tasks"];
    args.extend(flags.iter().map(String::as_str));
    let out = cli(&host, &args);
    assert!(
        out.status.success(),
        "cloudai tasks over HTTPS failed: {}\nhost log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
    // The same flags from the environment, as a service unit sets them.
    let mut command = Command::new(binary());
    command
        .args(["tasks", "-o", "json"])
        .env("CLOUDAI_HOST", &host.url)
        .env("CLOUDAI_TOKEN", ALICE_TOKEN)
        .env("CLOUDAI_CA_CERT", pki.path("ca.pem"))
        .env("CLOUDAI_CLIENT_CERT", pki.path("client.pem"))
        .env("CLOUDAI_CLIENT_KEY", pki.path("client.key"));
    let out = run_within(
        "cloudai tasks (TLS from env)",
        &mut command,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed["tasks"].is_array(), "{listed}");

    // Without the CA, the CLI says it cannot reach the host, and why.
    let out = cli(&host, &["tasks"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach the CloudAI host") && stderr.contains("certificate"),
        "{stderr}"
    );
    // A file that is not there, or not PEM, is named before anything is sent.
    let missing = pki.arg("missing.pem");
    let out = cli(&host, &["tasks", "--ca-cert", &missing]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--ca-cert") && stderr.contains("missing.pem"),
        "{stderr}"
    );
    let key = pki.arg("client.key");
    let out = cli(&host, &["tasks", "--ca-cert", &key]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no certificate in it"), "{stderr}");
    // A certificate without its key is a usage error.
    let certificate = pki.arg("client.pem");
    let out = cli(&host, &["tasks", "--client-cert", &certificate]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--client-key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Submits `command` as alice and waits for its result: (worker_id, logs).
async fn run_task(
    host: &TestHost,
    command: &str,
    extra_log: &(dyn Fn() -> String + Send + Sync),
) -> (String, String) {
    let spec = json!({"docker_image": IMAGE, "command": command, "req_cpu": 0.25,
        "req_memory": 0.25});
    let (status, body) = host
        .call(
            Method::POST,
            "/v1/tasks",
            Some(ALICE_TOKEN),
            Some(&spec.to_string()),
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let task_id = body["task_id"].as_str().unwrap().to_string();
    let path = format!("/v1/tasks/{task_id}/result");
    let result = host
        .eventually(format!("{command:?} completes"), Duration::from_secs(60))
        .log("worker log", extra_log)
        .until(async || {
            let (_, body) = host
                .call(Method::GET, &path, Some(ALICE_TOKEN), None, &[])
                .await;
            if body["logs"].is_string() {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await;
    (
        result["worker_id"].as_str().unwrap_or_default().to_string(),
        result["logs"].as_str().unwrap_or_default().to_string(),
    )
}

/// The local worker of an HTTPS host that requires client certificates joins through its
/// loopback listener and runs a task; a `cloudai worker` process joins another such host with
/// `--ca-cert` and a client certificate and runs a task in a container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_an_https_host_and_run_its_tasks() {
    if docker_ready().await.is_none() {
        return;
    }
    let pki = Pki::generate();
    let nothing = || String::new();
    {
        let host = start_https(&pki, &["--stop-grace-s", "1"]);
        let (worker_id, logs) = run_task(&host, "echo local", &nothing).await;
        assert_eq!(logs, "local\n");
        let (_, workers) = host
            .call(
                Method::GET,
                "/v1/workers",
                Some(&host.admin_token),
                None,
                &[],
            )
            .await;
        assert_eq!(
            workers["workers"][0]["worker_id"],
            worker_id.as_str(),
            "{workers}"
        );
        assert_eq!(
            workers["workers"][0]["labels"]["cloudai.local"], "true",
            "{workers}"
        );
    }

    let host = start_https(&pki, &["--no-local-worker"]);
    let state = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = Command::new(binary())
        .args([
            "worker",
            "--host",
            &host.url,
            "--state-dir",
            state.path().to_str().unwrap(),
            "--storage-path",
            "/",
            "--heartbeat-interval-s",
            "1",
            "--stop-grace-s",
            "1",
            "--cpu",
            "2",
            "--memory-gb",
            "2",
        ])
        .args(pki.client_flags())
        .env("CLOUDAI_JOIN_TOKEN", &host.join_token)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("starting cloudai worker");
    let worker_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let (worker_id, logs) = run_task(&host, "echo over tls", &worker_log).await;
    assert_eq!(logs, "over tls\n", "worker log:\n{}", worker_log());
    assert!(worker_id.starts_with("worker-"), "{worker_id}");
    let _ = worker.kill();
    let _ = worker.wait();
}

/// A renewed certificate is taken on SIGHUP, without a restart; files that do not load leave
/// the current one in place. A host without TLS lives through a SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_sighup() {
    let first = Pki::generate();
    let renewed = Pki::generate();
    let flags = [
        "--no-local-worker".to_string(),
        "--tls-cert".into(),
        first.arg("server.pem"),
        "--tls-key".into(),
        first.arg("server.key"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let host = TestHost::start_with(StoreKind::Embedded, &flags).expect("host starts");
    let health = format!("{}/healthz", host.url);
    let served = async |client: reqwest::Client| client.get(&health).send().await;
    assert!(served(first.client(Some("ca.pem"), None)).await.is_ok());

    // A broken file: refused, and the current certificate still served.
    std::fs::write(first.path("server.pem"), "not a certificate").unwrap();
    host.signal("HUP");
    host.wait_for_log(
        "did not load; still serving the previous one",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(served(first.client(Some("ca.pem"), None)).await.is_ok());

    // The renewed certificate (another CA here, so that the two are told apart).
    std::fs::copy(renewed.path("server.pem"), first.path("server.pem")).unwrap();
    std::fs::copy(renewed.path("server.key"), first.path("server.key")).unwrap();
    host.signal("HUP");
    host.wait_for_log("TLS certificate reloaded", Duration::from_secs(10))
        .await
        .unwrap();
    let answer = served(renewed.client(Some("ca.pem"), None)).await;
    assert!(
        answer.is_ok(),
        "the renewed certificate is not served: {answer:?}"
    );
    let old = served(first.client(Some("ca.pem"), None)).await;
    assert!(old.is_err(), "the old certificate is still served: {old:?}");

    // Without TLS, SIGHUP changes nothing (its default would end the process).
    let plain = TestHost::start(StoreKind::Embedded).expect("host starts");
    plain.signal("HUP");
    plain
        .wait_for_log("SIGHUP: nothing to reload", Duration::from_secs(10))
        .await
        .unwrap();
    let (status, _) = plain.call(Method::GET, "/healthz", None, None, &[]).await;
    assert_eq!(status, 200);
}

/// Plain HTTP on an address other machines reach is refused at start-up, before anything is
/// opened, and says how to serve it; nothing is bound (the check runs before the bind).
#[test]
fn plain_http_on_a_reachable_address_is_refused_unless_asked_for() {
    let data_dir = tempfile::tempdir().unwrap();
    let store_dir = data_dir.path().join("never-created");
    let mut command = Command::new(binary());
    command
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--no-local-worker",
            "--data-dir",
        ])
        .arg(&store_dir)
        .env_remove("CLOUDAI_ALLOW_PLAIN_HTTP")
        .env_remove("CLOUDAI_MONGODB_URI");
    let out = run_within(
        "cloudai serve --listen 0.0.0.0:0",
        &mut command,
        Duration::from_secs(30),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to serve plain HTTP on 0.0.0.0:0")
            && stderr.contains("--tls-cert")
            && stderr.contains("--allow-plain-http"),
        "{stderr}"
    );
    assert!(
        !Path::new(&store_dir).exists(),
        "a refused start created its data dir"
    );
}
