//! A private `redis-server` on a free loopback port, for tests and benches:
//! started here, killed when dropped. Readiness is read from the server's
//! own log ("Ready to accept connections"), so nothing sleeps.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running (or stopped) private redis-server.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Starts redis-server on `port`; `None` if it exits before it is ready
/// (e.g. the port was taken meanwhile).
fn spawn(port: u16, dir: &PathBuf) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (apt-get install redis-server)");
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(_) if line.contains("Ready to accept connections") => break,
            Ok(_) => {}
        }
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while matches!(out.read_line(&mut sink), Ok(n) if n > 0) {
            sink.clear();
        }
    });
    Some(child)
}

impl RedisServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> Self {
        for _ in 0..20 {
            let port = free_port();
            let dir = std::env::temp_dir()
                .join(format!("tower-qwen-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            if let Some(child) = spawn(port, &dir) {
                return Self {
                    child: Some(child),
                    port,
                    dir,
                };
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("could not start redis-server");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if let Some(c) = spawn(self.port, &self.dir) {
                self.child = Some(c);
                return;
            }
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Freezes the server (SIGSTOP): it accepts nothing and answers nothing,
    /// like a hung or overloaded Redis.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A frozen server must be thawed to die cleanly.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
