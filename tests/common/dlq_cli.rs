//! `rabbit-guard dlq …` run as an operator would: a config file written
//! from settings, the binary, its stdout and stderr.

use std::process::Output;

use rabbit_guard::config::Settings;
use serde_json::Value;

/// Writes `settings` to a config file and runs `rabbit-guard dlq <args>`.
pub struct Cli {
    dir: tempfile::TempDir,
    queue: String,
}

impl Cli {
    pub fn new(settings: &Settings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("c.toml"),
            toml::to_string(settings).unwrap(),
        )
        .unwrap();
        Self {
            dir,
            queue: settings.consumers[0].queue.clone(),
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(super::cli_binary());
        c.arg("dlq")
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("c.toml"))
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null());
        c
    }

    /// `rabbit-guard dlq <args> --queue <the consumer's queue>`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .arg("--queue")
            .arg(&self.queue)
            .output()
            .expect("run rabbit-guard dlq")
    }

    /// `rabbit-guard dlq <args>` without `--queue` (for `--dlq NAME`).
    pub fn run_bare(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run rabbit-guard dlq")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dlq {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `dlq list --json` of any queue (`--dlq NAME`): a look without consuming.
    pub fn peek(&self, queue: &str) -> Vec<Value> {
        let out = self.run_bare(&["list", "--json", "--dlq", queue]);
        assert!(
            out.status.success(),
            "dlq list --dlq {queue} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    pub fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["list", "--json"];
        all.extend(args);
        self.ok(&all)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}
