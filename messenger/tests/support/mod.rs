//! The stack the messenger's tests run against: the Kafka scheduler (in process, its own topics),
//! the MySQL baseline (a fresh database), and the messenger's connections (its own topics, group
//! and audit database), all on the real local servers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use db_scheduler::testkit::fresh_database;
use db_scheduler::DbScheduler;
use messenger::Connections;
use scheduler::testkit::*;
use scheduler::Scheduler;

pub struct Stack {
    pub names: Names,
    pub scheduler: Scheduler,
    pub baseline: DbScheduler,
    pub conn: Connections,
}

/// Starts the scheduler and the baseline (polling every 100 ms), and prepares the messenger's
/// connections with `senders` senders.
pub async fn start_stack(name: &str, senders: usize, success_rate: f64) -> Stack {
    let names = Names::new(name);
    let scheduler = start_in_process(&names).await;
    let mysql_url = fresh_database().await;
    let db_config = db_scheduler::testkit::config(&mysql_url, "100ms", 1000);
    let baseline = DbScheduler::start(db_config, Arc::new(scheduler::SystemClock))
        .await
        .expect("baseline starts");
    let base = unique(&format!("{name}-sms"));
    let conn = Connections {
        bootstrap_servers: bootstrap(),
        kafka_properties: Vec::new(),
        mongodb_uri: std::env::var("SM_MONGODB_URI")
            .unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
            .into(),
        mongodb_database: unique(name).replace('-', "_"),
        mysql_url: mysql_url.into(),
        ingest_topic: names.ingest.clone(),
        sms_topic: format!("{base}-messages"),
        status_topic: format!("{base}-status"),
        senders_group: format!("{base}-senders"),
        senders,
        success_rate,
        processing_time: Duration::from_millis(20),
        scheduler_url: format!("http://{}", scheduler.http_addr).into(),
        http_addr: "127.0.0.1:0".parse().expect("an address"),
    };
    Stack {
        names,
        scheduler,
        baseline,
        conn,
    }
}

impl Stack {
    pub async fn stop(self) {
        self.baseline.stop().await;
        self.scheduler.stop().await.expect("clean stop");
    }
}
