//! Debian's headless Chromium for the web page tests: one-shot `--dump-dom` and
//! `--screenshot` runs, and a long-lived browser driven over the Chrome DevTools Protocol
//! (`--remote-debugging-port`, a WebSocket) for what needs a page that stays open: a live log,
//! a login form, cookies.
//!
//! Every Chromium runs in a process group of its own with a fresh profile directory and dies
//! with the test: the one-shot runs are killed at their deadline or when dropped, the
//! long-lived one through the harness's `Process` (killed on drop, and by the parent-death
//! signal if the test process dies).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::process::{Process, command_dying_with_test, spawn};
use crate::wait::wait_for;

/// Where Debian's `chromium` package puts the browser (`scripts/lib.sh` installs it).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one page may take to load and render.
const PAGE_DEADLINE: Duration = Duration::from_secs(60);

/// The flags every Chromium of the tests runs with: headless, as root (no sandbox), quiet (no
/// first-run, updates, sync, background traffic or QUIC), and a profile of its own.
fn base_args(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ]
    .iter()
    .map(|flag| flag.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

fn chromium() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(CHROMIUM);
    if !path.is_file() {
        bail!(
            "{CHROMIUM} is missing: run scripts/e2e (or scripts/test), which installs Debian's chromium"
        );
    }
    Ok(path)
}

/// A one-shot Chromium: killed (its whole process group) when dropped.
struct OneShot {
    child: std::process::Child,
}

impl Drop for OneShot {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Runs Chromium once with `args` and `url`, its stdout into `stdout` (or nowhere) and its
/// stderr into `log`; fails at the deadline.
async fn run_once(
    args: &[String],
    url: &str,
    stdout: Option<&Path>,
    log: &Path,
) -> anyhow::Result<()> {
    let profile = tempfile::Builder::new()
        .prefix("slimci-chromium-")
        .tempdir()?;
    let mut command = command_dying_with_test(&chromium()?);
    command
        .args(base_args(profile.path()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(match stdout {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::null(),
        })
        .stderr(std::fs::File::create(log)?);
    let mut once = OneShot {
        child: spawn(command).context("starting chromium")?,
    };
    let status = wait_for(
        &format!("chromium {} {url}", args.join(" ")),
        PAGE_DEADLINE,
        || {
            let exited = once.child.try_wait();
            async move { Ok(exited?) }
        },
    )
    .await?;
    if !status.success() {
        bail!(
            "chromium exited with {status} on {url}:\n{}",
            crate::process::tail(log)
        );
    }
    Ok(())
}

/// The page at `url` as Chromium built it, after its load event (`--dump-dom`).
pub async fn dump_dom(url: &str, work: &Path) -> anyhow::Result<String> {
    let stdout = work.join("dump-dom.html");
    run_once(
        &["--dump-dom".to_owned()],
        url,
        Some(&stdout),
        &work.join("dump-dom.log"),
    )
    .await?;
    Ok(std::fs::read_to_string(&stdout)?)
}

/// A PNG of the page at `url` in a window of `width`×`height` (`--screenshot`).
pub async fn screenshot(url: &str, png: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(png);
    run_once(
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={width},{height}"),
        ],
        url,
        None,
        &png.with_extension("chromium.log"),
    )
    .await?;
    let bytes =
        std::fs::read(png).with_context(|| format!("chromium wrote no {}", png.display()))?;
    if !bytes.starts_with(b"\x89PNG") {
        bail!("{} is not a PNG", png.display());
    }
    Ok(())
}

/// Where the web tests keep their screenshots: `target/web-screenshots/` of the workspace.
pub fn screenshot_dir() -> anyhow::Result<PathBuf> {
    let dir = crate::binaries::workspace_root().join("target/web-screenshots");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium that stays open, driven over the DevTools protocol through its first
/// page.
pub struct Browser {
    socket: Socket,
    next_id: u64,
    // Dropped after the socket: the browser dies with its process group.
    _process: Process,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start(log_dir: &Path) -> anyhow::Result<Browser> {
        let profile = tempfile::Builder::new()
            .prefix("slimci-chromium-")
            .tempdir()?;
        let mut args = base_args(profile.path());
        args.push("--remote-debugging-port=0".to_owned());
        args.push("--window-size=1280,1600".to_owned());
        args.push("about:blank".to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::start(
            "chromium",
            &chromium()?,
            &args,
            log_dir.join("chromium.log"),
        )?;
        // Chromium writes the port it chose, then the browser's path, into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = wait_for("chromium's DevTools port", PAGE_DEADLINE, || async {
            Ok(std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok()))
        })
        .await?;
        let http = crate::cluster::http_client();
        let list_url = format!("http://127.0.0.1:{port}/json/list");
        let page_socket = wait_for("chromium's first page", PAGE_DEADLINE, || async {
            let Ok(response) = http.get(&list_url).send().await else {
                return Ok(None);
            };
            let targets: Vec<Value> = response.json().await.unwrap_or_default();
            Ok(targets
                .iter()
                .find(|target| target["type"] == "page")
                .and_then(|target| target["webSocketDebuggerUrl"].as_str())
                .map(str::to_owned))
        })
        .await?;
        let (socket, _) = tokio::time::timeout(
            PAGE_DEADLINE,
            tokio_tungstenite::connect_async(page_socket.as_str()),
        )
        .await
        .context("connecting to chromium's page timed out")??;
        let mut browser = Browser {
            socket,
            next_id: 0,
            _process: process,
            _profile: profile,
        };
        browser.call("Page.enable", json!({})).await?;
        browser.call("Network.enable", json!({})).await?;
        Ok(browser)
    }

    /// Sends one DevTools command and returns its result; events in between are skipped.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params }).to_string();
        let answer = async {
            self.socket.send(Message::text(request)).await?;
            while let Some(message) = self.socket.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let value: Value = serde_json::from_str(text.as_str())?;
                if value["id"] != id {
                    continue;
                }
                if let Some(error) = value.get("error") {
                    bail!("{method} failed: {error}");
                }
                return Ok(value["result"].clone());
            }
            bail!("chromium closed the DevTools connection")
        };
        tokio::time::timeout(PAGE_DEADLINE, answer)
            .await
            .with_context(|| format!("chromium did not answer {method}"))?
    }

    /// The value of JavaScript `expression` in the page.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("`{expression}` threw: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Opens `url` and waits until the page has loaded (after any redirects).
    pub async fn open(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({ "url": url })).await?;
        self.wait_loaded(&format!("{url} to load")).await
    }

    /// Waits for the page to reach its load event again (after a navigation it started).
    pub async fn wait_loaded(&mut self, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + PAGE_DEADLINE;
        loop {
            let state = self
                .eval("document.readyState + ' ' + location.href")
                .await?;
            if state
                .as_str()
                .is_some_and(|text| text.starts_with("complete") && !text.ends_with("about:blank"))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what} ({state})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls JavaScript `expression` until it is truthy; returns its value.
    pub async fn wait_until(
        &mut self,
        what: &str,
        expression: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            crate::process::check_watched()?;
            let value = self.eval(expression).await?;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("");
            if truthy {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what} (last: {value})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The browser's cookies for `url`.
    pub async fn cookies(&mut self, url: &str) -> anyhow::Result<Vec<Value>> {
        let result = self
            .call("Network.getCookies", json!({ "urls": [url] }))
            .await?;
        Ok(result["cookies"].as_array().cloned().unwrap_or_default())
    }

    /// The page's whole HTML as it is now.
    pub async fn html(&mut self) -> anyhow::Result<String> {
        Ok(self
            .eval("document.documentElement.outerHTML")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}
