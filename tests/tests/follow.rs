//! The CLI's follower does not wait in silence: while no agent consumes the job queue it says
//! so, naming the queue, and once an agent connects the run builds and the follower ends with
//! the run's result. Real coordinator, RabbitMQ, agent and dbt.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slimci_tests::{Cluster, ClusterOptions, wait_for};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_says_no_agent_is_connected_and_ends_once_one_builds_the_run() {
    let mut cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut command = tokio::process::Command::from(cluster.cli());
    command
        .args(["deploy", "--repo", "shop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut follower = command.spawn().unwrap();
    // Everything the follower prints, read as it comes.
    let printed = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(follower.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(follower.stderr.take().unwrap()),
    ] {
        let printed = printed.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut buffer = [0u8; 4096];
            while let Ok(read @ 1..) = stream.read(&mut buffer).await {
                printed
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
    }
    let queue = format!("{}.jobs", cluster.prefix);
    wait_for(
        "the follower to say no agent is connected",
        Duration::from_secs(60),
        || {
            let printed = printed.lock().unwrap().clone();
            let queue = queue.clone();
            async move {
                Ok(printed
                    .contains(&format!("no agent is connected to the job queue {queue}"))
                    .then_some(()))
            }
        },
    )
    .await
    .unwrap();

    cluster.start_agent("late-agent", 1).unwrap();
    let status = wait_for(
        "the follower to end once the run is built",
        Duration::from_secs(180),
        || {
            let exited = follower.try_wait();
            async move { Ok(exited?) }
        },
    )
    .await
    .unwrap();
    let printed = printed.lock().unwrap().clone();
    assert!(status.success(), "{status}: {printed}");
    assert!(printed.contains("success"), "{printed}");
    cluster.assert_all_alive();
}
