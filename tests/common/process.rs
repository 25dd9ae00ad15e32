//! The `call-proxy` binary as a process of its own, its JSON log read line by line.

use std::net::SocketAddr;
use std::time::Instant;

use super::WAIT;

/// The `call-proxy` binary as its own process, on a free port, JSON logs read line by line.
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far, so a later wait can find an earlier line.
    history: std::sync::Mutex<Vec<String>>,
    /// The port the demo backend is moved to: bound, never listening.
    _closed: tokio::net::TcpSocket,
}

impl ServiceProcess {
    pub fn spawn(env: &[(&str, &str)]) -> ServiceProcess {
        Self::spawn_under(&[], env)
    }

    /// The binary run under a wrapper command (`prlimit --nofile=…`, say).
    pub fn spawn_under(wrapper: &[&str], env: &[(&str, &str)]) -> ServiceProcess {
        use std::io::BufRead;
        let binary = env!("CARGO_BIN_EXE_call-proxy");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(binary);
                c
            }
            None => std::process::Command::new(binary),
        };
        // The embedded demo backend points at the walk-through's local-speaker port, which a
        // developer's own local-speaker may hold: tests move it to a port held here without
        // listening (every connect refused) for as long as the process runs.
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let closed_url = format!("ws://{}/media", closed.local_addr().unwrap());
        cmd.env_remove("RUST_LOG")
            .env_remove("RUN_MODE")
            .env("CALL_PROXY__BACKENDS__TABLE__SPEAKER__URL", &closed_url)
            .env("CALL_PROXY__SERVER__HOST", "127.0.0.1")
            .env("CALL_PROXY__SERVER__PORT", "0")
            .env("CALL_PROXY__LOG__FORMAT", "json")
            .env("CALL_PROXY__STORE__PATH", "")
            .env("SERVER_API_KEY", "test-key")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("call-proxy starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = ServiceProcess {
            _closed: closed,
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            history: Default::default(),
        };
        let line = p.wait_for_log("call-proxy listening");
        p.addr = line["addr"].as_str().unwrap().parse().unwrap();
        p
    }

    /// The first JSON log line whose message is `message`.
    pub fn wait_for_log(&self, message: &str) -> serde_json::Value {
        let matches = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .filter(|v| v["message"] == message)
        };
        let mut history = self.history.lock().unwrap();
        if let Some(v) = history.iter().find_map(|l| matches(l)) {
            return v;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    history.push(line);
                    if let Some(v) = found {
                        return v;
                    }
                }
                Err(_) => panic!("no log line {message:?}; saw:\n{}", history.join("\n")),
            }
        }
    }

    /// Waits for a raw log line that `pred` accepts (an earlier one counts too).
    pub fn wait_for_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut history = self.history.lock().unwrap();
        if let Some(line) = history.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = pred(&line);
                    history.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(_) => panic!("no log line for {what}; saw:\n{}", history.join("\n")),
            }
        }
    }

    /// Every line logged so far.
    pub fn lines(&self) -> Vec<String> {
        let mut history = self.history.lock().unwrap();
        while let Ok(line) = self.lines.try_recv() {
            history.push(line);
        }
        history.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The metrics page, as a scraper reads it.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The operator page as an operator sees it, logged in with the test key.
    pub async fn admin_page(&self) -> String {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let login = client
            .post(self.url("/admin/login"))
            .form(&[("key", "test-key")])
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), 303, "logged in");
        let cookie = login.headers()["set-cookie"].to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_string();
        client
            .get(self.url("/admin"))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/media", self.addr)
    }

    /// [`spawn`](Self::spawn) from async code (it blocks until the listening line).
    pub async fn start(env: &[(&str, &str)]) -> ServiceProcess {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            ServiceProcess::spawn(&env)
        })
        .await
        .unwrap()
    }

    /// [`wait_exit`](Self::wait_exit) from async code; hands the process back for its log.
    pub async fn exited(self, limit: std::time::Duration) -> (std::process::ExitStatus, Self) {
        tokio::task::spawn_blocking(move || {
            let mut proxy = self;
            (proxy.wait_exit(limit), proxy)
        })
        .await
        .unwrap()
    }

    /// SIGTERM, as a deploy or `systemctl stop` sends it.
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, or fails the test after `limit`.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, limit)
    }

    /// SIGKILL: no shutdown, nothing flushed, as a crash.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a child to exit, or fails the test after `limit`.
pub fn wait_exit(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(began.elapsed() < limit, "no exit within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}
