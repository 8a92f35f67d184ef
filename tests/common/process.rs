//! The `rabbit-guard` binary as a child process.

use super::*;

/// The `rabbit-guard` binary as a child process, killed when dropped.
pub struct Child {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl Child {
    /// Runs `rabbit-guard <args>` with `settings` written to a config file,
    /// stderr captured to a file.
    pub fn spawn(settings: &Settings, args: &[&str]) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
        Self::spawn_with_config(dir, &config, args)
    }

    pub fn spawn_with_config(
        dir: Arc<tempfile::TempDir>,
        config: &std::path::Path,
        args: &[&str],
    ) -> Self {
        let log = dir.path().join("stderr.log");
        let child = std::process::Command::new(cli_binary())
            .args(args)
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("RUN_MODE")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the rabbit-guard binary");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{signal} {} failed: {status}",
            self.pid()
        );
    }

    /// Waits for the exit status, polling, up to `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
