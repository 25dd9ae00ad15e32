//! The files in `deploy/`, tested as far as this machine allows. No container engine or
//! cluster runs here, so: the binary is run exactly as the image's entrypoint and the systemd
//! unit's `ExecStart` run it (their environment, absolute config and data paths, another
//! working directory, a non-root user when the tests run as root), and the YAML is read for
//! the probes and grace periods that the code's own settings call for.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use call_proxy::config::{Settings, Sources};
use common::*;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What a Secret or an EnvironmentFile gives a production instance.
const SECRETS: &[(&str, &str)] = &[
    ("TWILIO_AUTH_TOKEN", "an-auth-token"),
    ("CALL_PROXY__GATE__PIN_KEY", "a-pin-key-of-some-length"),
    (
        "CALL_PROXY__SECURITY__ROUTE_TOKEN_SECRET",
        "a-route-token-secret",
    ),
    ("SERVER_API_KEY", "an-api-key"),
];

/// The settings the shipped config file gives a production instance.
fn shipped_settings() -> Settings {
    let mut env: BTreeMap<String, String> = SECRETS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("RUN_MODE".into(), "production".into());
    Settings::load(&Sources {
        run_mode: Some("production".into()),
        file: Some(repo("deploy/call-proxy.toml")),
        env,
    })
    .expect("deploy/call-proxy.toml is a valid production config")
}

/// How long a stop may take: the drain, then ending what is left.
fn stop_budget(s: &Settings) -> Duration {
    s.drain_timeout() + s.shutdown_timeout()
}

/// A grace period that covers the stop budget with a margin of at most a minute.
fn assert_matches_drain(what: &str, grace: Duration, s: &Settings) {
    let budget = stop_budget(s);
    assert!(
        grace > budget && grace <= budget + Duration::from_secs(60),
        "{what} is {grace:?}; the drain takes up to {budget:?}"
    );
}

// ---- the Dockerfile ----------------------------------------------------------------------

/// The final stage's instructions, continuation lines joined.
fn final_stage(dockerfile: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = joined
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    joined[last_from..]
        .iter()
        .filter_map(|l| {
            l.split_once(char::is_whitespace)
                .map(|(i, rest)| (i.to_string(), rest.trim().to_string()))
        })
        .collect()
}

fn exec_form(value: &str) -> Vec<String> {
    serde_json::from_str(value).unwrap_or_else(|e| panic!("exec form expected: {value}: {e}"))
}

/// A filesystem laid out under a temporary directory as the image or the host would have it.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        Root {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The path inside the root for an absolute path of the image or host.
    fn at(&self, absolute: &str) -> PathBuf {
        self.dir.path().join(absolute.trim_start_matches('/'))
    }

    /// A word of a command line or an environment value, its absolute paths moved inside.
    fn map(&self, word: &str) -> String {
        if word == "/usr/local/bin/call-proxy" {
            return env!("CARGO_BIN_EXE_call-proxy").to_string();
        }
        let mut out = word.to_string();
        for prefix in ["/etc/call-proxy", "/var/lib/call-proxy"] {
            out = out.replace(prefix, &self.at(prefix).to_string_lossy());
        }
        out
    }

    /// A directory the service's user owns.
    fn state_dir(&self, absolute: &str) -> PathBuf {
        let dir = self.at(absolute);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = unprivileged() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        dir
    }
}

/// `nobody`, when the tests run as root, can switch to it, and `nobody` can run the built
/// binary where it lies (a checkout under a private home directory is out of its reach).
fn unprivileged() -> Option<(u32, u32)> {
    static NOBODY: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *NOBODY.get_or_init(|| {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let runs = root
            && Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_call-proxy"))
                .arg("--version")
                .env_clear()
                .output()
                .is_ok_and(|o| o.status.success());
        if !runs {
            eprintln!("not running the binary as nobody here (not root, no setpriv, or the binary is out of its reach): running it as this user");
        }
        runs.then_some((65534, 65534))
    })
}

/// A command that runs `argv` as the image or unit would: only the given environment, in
/// `cwd`, as `nobody` when possible.
fn command(argv: &[String], env: &[(String, String)], cwd: &Path) -> Command {
    let mut cmd = match unprivileged() {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ]);
            c.args(argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null());
    cmd
}

/// A running instance: its process and the port it listens on.
struct Running {
    child: std::process::Child,
    port: u16,
    log: std::sync::mpsc::Receiver<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let port = loop {
            let line = log
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no listening line; saw:\n{}", seen.join("\n")));
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["message"] == "call-proxy listening" {
                    let addr: std::net::SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
                    assert!(
                        addr.ip().is_unspecified(),
                        "production listens on every interface: {addr}"
                    );
                    break addr.port();
                }
            }
            seen.push(line);
        };
        Running { child, port, log }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    /// The stop signal, and the exit it leads to.
    fn stop(mut self, signal: &str) -> std::process::ExitStatus {
        let name = signal.trim_start_matches("SIG");
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = wait_exit(&mut self.child, Duration::from_secs(10));
        // The log up to the end of the pipe: the thread reading it may be a line behind.
        let mut lines = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        assert!(
            lines.iter().any(|l| l.contains("shutdown complete")),
            "{lines:#?}"
        );
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_entrypoint_runs_as_non_root_from_its_absolute_paths() {
    let stage = final_stage(&read("deploy/Dockerfile"));
    let all = |name: &str| -> Vec<String> {
        stage
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let one = |name: &str| -> String {
        let found = all(name);
        assert_eq!(found.len(), 1, "one {name} in the final stage: {found:?}");
        found[0].clone()
    };
    let user = one("USER");
    assert!(user != "root" && user != "0", "non-root: {user}");
    assert_eq!(one("STOPSIGNAL"), "SIGTERM");
    let workdir = one("WORKDIR");
    assert!(workdir.starts_with('/'), "{workdir}");
    let healthcheck = one("HEALTHCHECK");
    let health_argv = exec_form(
        healthcheck
            .split_once("CMD")
            .expect("HEALTHCHECK CMD")
            .1
            .trim(),
    );
    let argv: Vec<String> = exec_form(&one("ENTRYPOINT"))
        .into_iter()
        .chain(exec_form(&one("CMD")))
        .collect();
    let env: Vec<(String, String)> = all("ENV")
        .iter()
        .flat_map(|line| {
            line.split_whitespace()
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                    (k.to_string(), v.to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let env_value = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(env_value("RUN_MODE").as_deref(), Some("production"));
    let config = env_value("CALL_PROXY_CONFIG").expect("the config path in the image");
    let journal = env_value("CALL_PROXY__STORE__PATH").expect("the journal path in the image");
    assert!(config.starts_with('/') && journal.starts_with('/'));
    // The shipped config is what the image copies to that path.
    let copied = all("COPY")
        .into_iter()
        .find(|c| c.ends_with(&config))
        .expect("the config file is copied in");
    assert!(copied.starts_with("deploy/call-proxy.toml"), "{copied}");

    // Lay the image's files out, and run it as the image would, with a real Redis where the
    // compose file puts one; the memory engine's journal where the image keeps it.
    let root = Root::new();
    std::fs::create_dir_all(root.at("/etc/call-proxy")).unwrap();
    std::fs::copy(repo("deploy/call-proxy.toml"), root.map(&config)).unwrap();
    let data = root.state_dir(Path::new(&journal).parent().unwrap().to_str().unwrap());
    let cwd = root.state_dir(&workdir);
    let redis = RedisServer::start();
    let mut run_env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.clone(), root.map(v)))
        .chain(SECRETS.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    // The port is the test's choice (never assume one is free); Redis is the test's.
    run_env.push(("CALL_PROXY__SERVER__PORT".into(), "0".into()));
    run_env.push(("CALL_PROXY__STORE__REDIS_URL".into(), redis.url()));
    let argv: Vec<String> = argv.iter().map(|w| root.map(w)).collect();
    let running = Running::start(command(&argv, &run_env, &cwd));
    let (status, health) = running.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(health["store"], "up", "{health}");
    assert_eq!(running.get("/readyz").await.0, 200);

    // The HEALTHCHECK command answers for the running instance.
    let mut probe_env = run_env.clone();
    probe_env.retain(|(k, _)| k != "CALL_PROXY__SERVER__PORT");
    probe_env.push(("CALL_PROXY__SERVER__PORT".into(), running.port.to_string()));
    let health_argv: Vec<String> = health_argv.iter().map(|w| root.map(w)).collect();
    let probe = command(&health_argv, &probe_env, &cwd).output().unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let stopped = running.stop(&one("STOPSIGNAL"));
    assert!(stopped.success(), "{stopped}");
    // Nothing answers there any more: the HEALTHCHECK says so.
    let probe = command(&health_argv, &probe_env, &cwd).output().unwrap();
    assert!(!probe.status.success());

    // The memory engine keeps its journal at the image's absolute path, whatever the cwd.
    run_env.push(("CALL_PROXY__STORE__KIND".into(), "memory".into()));
    let running = Running::start(command(&argv, &run_env, Path::new("/")));
    assert_eq!(running.get("/healthz").await.0, 200);
    assert!(running.stop("SIGTERM").success());
    assert!(
        data.join("state.log").is_file(),
        "the journal is in {data:?}"
    );
}

// ---- the systemd unit --------------------------------------------------------------------

/// `[Service]` lines of a unit, in order (a key may repeat, as `Environment=` does).
fn service_section(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_unit_matches_the_drain_and_runs_as_its_exec_start_says() {
    let unit = read("deploy/systemd/call-proxy.service");
    let service = service_section(&unit);
    let get = |k: &str| -> Vec<String> {
        service
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let one = |k: &str| get(k).pop().unwrap_or_else(|| panic!("{k}= in [Service]"));
    let settings = shipped_settings();
    let stop_secs: u64 = one("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert_matches_drain("TimeoutStopSec", Duration::from_secs(stop_secs), &settings);
    assert_eq!(one("KillMode"), "mixed");
    assert_eq!(one("KillSignal"), "SIGTERM");
    for hardening in ["NoNewPrivileges", "ProtectSystem", "StateDirectory"] {
        assert!(!get(hardening).is_empty(), "{hardening}= is set");
    }
    assert_eq!(one("ProtectSystem"), "strict");
    let state = one("StateDirectory");

    // ExecStart run as systemd runs it: the unit's environment, its state directory in
    // STATE_DIRECTORY, the cwd `/`, an unprivileged user.
    let root = Root::new();
    let exec: Vec<String> = one("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let config = exec
        .iter()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .expect("--config FILE");
    std::fs::create_dir_all(root.at("/etc/call-proxy")).unwrap();
    std::fs::copy(repo("deploy/call-proxy.toml"), root.map(config)).unwrap();
    let state_dir = root.state_dir(&format!("/var/lib/{state}"));
    let mut env: Vec<(String, String)> = get("Environment")
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').expect("Environment=KEY=VALUE");
            (k.to_string(), root.map(v))
        })
        .collect();
    env.push(("STATE_DIRECTORY".into(), state_dir.to_string_lossy().into()));
    env.extend(SECRETS.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // One host, no Redis: the memory engine and its journal.
    env.push(("CALL_PROXY__STORE__KIND".into(), "memory".into()));
    env.push(("CALL_PROXY__SERVER__PORT".into(), "0".into()));
    let argv: Vec<String> = exec.iter().map(|w| root.map(w)).collect();
    let running = Running::start(command(&argv, &env, Path::new("/")));
    assert_eq!(running.get("/healthz").await.0, 200);
    assert!(running.stop(&one("KillSignal")).success());
    assert!(
        state_dir.join("state.log").is_file(),
        "the journal is in the unit's StateDirectory"
    );

    // systemd's own check, where systemd is installed.
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed here; the unit was checked by reading it");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("call-proxy.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/call-proxy",
            env!("CARGO_BIN_EXE_call-proxy"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // It reports a bad line and still exits 0: nothing may be said about this unit.
    assert!(!said.contains("call-proxy.service"), "{said}");
}

// ---- compose and Kubernetes --------------------------------------------------------------

/// A YAML file as compose and kubectl read it: anchors resolved and `<<` merge keys applied.
fn yaml(path: &str) -> Value {
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    doc.apply_merge().unwrap();
    serde_json::to_value(doc).unwrap()
}

fn seconds(text: &str) -> Duration {
    let n: u64 = text
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("a duration in seconds: {text}"));
    Duration::from_secs(n)
}

#[test]
fn compose_runs_two_instances_redis_and_a_speaker_behind_one_entry_point() {
    let settings = shipped_settings();
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_object().expect("services");
    let proxies: Vec<&Value> = ["proxy-a", "proxy-b"]
        .iter()
        .map(|n| services.get(*n).unwrap_or_else(|| panic!("{n}")))
        .collect();
    for p in &proxies {
        assert_eq!(p["build"]["dockerfile"], "deploy/Dockerfile");
        let grace = seconds(p["stop_grace_period"].as_str().expect("stop_grace_period"));
        assert_matches_drain("stop_grace_period", grace, &settings);
        assert_eq!(
            p["environment"]["CALL_PROXY__STORE__REDIS_URL"],
            "redis://redis:6379"
        );
    }
    assert!(services["redis"]["image"]
        .as_str()
        .unwrap()
        .starts_with("redis"));
    let speaker = &services["speaker"];
    assert_eq!(speaker["entrypoint"][0], "/usr/local/bin/local-speaker");
    assert_eq!(
        speaker["environment"]["LOCAL_SPEAKER_LISTEN"],
        "0.0.0.0:8888"
    );
    // The entry point publishes the port and checks readiness, so a draining instance gets
    // no new streams.
    let lb = &services["lb"];
    assert_eq!(lb["ports"][0], "8999:8999");
    let haproxy = read("deploy/haproxy.cfg");
    assert!(haproxy.contains("option httpchk GET /readyz"), "{haproxy}");
    for server in ["proxy-a:8999 check", "proxy-b:8999 check"] {
        assert!(haproxy.contains(server), "{server}");
    }
}

#[test]
fn kubernetes_probes_grace_period_and_budget_match_the_service() {
    let settings = shipped_settings();
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(deployment["kind"], "Deployment");
    let labels = &deployment["spec"]["selector"]["matchLabels"];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        &deployment["spec"]["template"]["metadata"]["labels"],
        labels
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert_matches_drain(
        "terminationGracePeriodSeconds",
        Duration::from_secs(grace),
        &settings,
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        container["lifecycle"]["preStop"].is_null(),
        "no preStop sleep: the drain keeps accepting"
    );
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(port, u64::from(settings.server.port));
    let env = container["env"].as_array().unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    assert_eq!(value("RUN_MODE").as_deref(), Some("production"));
    assert_eq!(
        value("CALL_PROXY_CONFIG").as_deref(),
        Some("/etc/call-proxy/call-proxy.toml")
    );

    let pdb = yaml("deploy/kubernetes/pdb.yaml");
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    let service = yaml("deploy/kubernetes/service.yaml");
    assert_eq!(service["kind"], "Service");
    assert_eq!(&service["spec"]["selector"], labels);

    // The ConfigMap carries the shipped config file itself, and the Secret example names
    // every secret production needs.
    let config_map = yaml("deploy/kubernetes/configmap.yaml");
    assert_eq!(
        config_map["data"]["call-proxy.toml"].as_str().unwrap(),
        read("deploy/call-proxy.toml"),
        "configmap.yaml holds deploy/call-proxy.toml as it is"
    );
    let secret = yaml("deploy/kubernetes/secret.example.yaml");
    for (name, _) in SECRETS {
        assert!(
            secret["stringData"][name].is_string(),
            "the Secret example names {name}"
        );
    }
}
