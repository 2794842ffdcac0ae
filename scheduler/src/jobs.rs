//! The job board: sweeps (jobs) and the workers that run them, as `GET /api/jq`, `/api/wq` and
//! `/api/job_log` show them. It is a view of this process's work; the durable state is in Kafka
//! (committed offsets), so nothing here is lost with the process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use crate::time::format_millis;

const LOG_CAPACITY: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum JobStatus {
    Ready,
    Working,
    /// The last attempt failed; the job is retried with backoff until it succeeds or its
    /// partitions are revoked.
    Retrying,
    Done,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// The scheduled sweep of one window.
    Sweep,
    /// A sweep of a slot topic after its partitions were assigned to this process.
    CatchUp,
}

/// What a sweep did with the records it read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCounts {
    pub records: u64,
    pub to_slices: u64,
    pub to_timer: u64,
    pub dead_lettered: u64,
}

impl JobCounts {
    pub fn add(&mut self, other: &JobCounts) {
        self.records += other.records;
        self.to_slices += other.to_slices;
        self.to_timer += other.to_timer;
        self.dead_lettered += other.dead_lettered;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub job_id: u64,
    pub name: String,
    pub kind: JobKind,
    pub level: usize,
    pub window: Option<i64>,
    pub slot_topic: String,
    /// Start of the window (RFC 3339 UTC), or the slot's name for a catch-up.
    pub lower: String,
    pub upper: String,
    pub lower_ms: Option<i64>,
    pub upper_ms: Option<i64>,
    pub sweep_at: Option<String>,
    pub creation_time: String,
    pub status: JobStatus,
    pub workers: Vec<String>,
    pub partitions: Vec<i32>,
    #[serde(flatten)]
    pub counts: JobCounts,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    /// Attempts so far (more than one after a failure).
    pub attempts: u32,
    #[serde(skip)]
    started_ms: Option<i64>,
}

/// What a new job covers.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub kind: JobKind,
    pub level: usize,
    pub window: Option<i64>,
    pub slot_topic: String,
    pub bounds: Option<(i64, i64)>,
    pub sweep_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WorkerStatus {
    Idle,
    Working,
}

#[derive(Debug, Clone, Serialize)]
pub struct Worker {
    pub worker_id: String,
    pub join_time: String,
    pub last_heartbeat: String,
    pub status: WorkerStatus,
    pub job_id: Option<u64>,
    pub jobs_done: u64,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    active: BTreeMap<u64, Job>,
    log: VecDeque<Job>,
    workers: BTreeMap<String, Worker>,
}

/// Jobs and workers, behind one lock that is never held across an `.await`.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only display data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a READY job.
    pub fn create(&self, spec: JobSpec, now_ms: i64) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        let job_id = inner.next_id;
        let name = match (spec.kind, spec.window) {
            (JobKind::Sweep, Some(w)) => format!("sweep L{} window {}", spec.level, w),
            _ => format!("catch-up {}", spec.slot_topic),
        };
        let (lower, upper) = match spec.bounds {
            Some((lo, hi)) => (format_millis(lo), format_millis(hi)),
            None => ("-".into(), "-".into()),
        };
        inner.active.insert(
            job_id,
            Job {
                job_id,
                name,
                kind: spec.kind,
                level: spec.level,
                window: spec.window,
                slot_topic: spec.slot_topic,
                lower,
                upper,
                lower_ms: spec.bounds.map(|b| b.0),
                upper_ms: spec.bounds.map(|b| b.1),
                sweep_at: spec.sweep_at.map(format_millis),
                creation_time: format_millis(now_ms),
                status: JobStatus::Ready,
                workers: Vec::new(),
                partitions: Vec::new(),
                counts: JobCounts::default(),
                started_at: None,
                finished_at: None,
                duration_ms: None,
                error: None,
                attempts: 0,
                started_ms: None,
            },
        );
        job_id
    }

    pub fn get(&self, job_id: u64) -> Option<Job> {
        self.lock().active.get(&job_id).cloned()
    }

    /// Marks a job WORKING under `worker`.
    pub fn start(&self, job_id: u64, worker: &str, partitions: Vec<i32>, now_ms: i64) {
        let mut inner = self.lock();
        if let Some(job) = inner.active.get_mut(&job_id) {
            job.status = JobStatus::Working;
            job.attempts += 1;
            if !job.workers.iter().any(|w| w == worker) {
                job.workers.push(worker.to_string());
            }
            job.partitions = partitions;
            job.started_at = Some(format_millis(now_ms));
            job.started_ms = Some(now_ms);
        }
        if let Some(w) = inner.workers.get_mut(worker) {
            w.status = WorkerStatus::Working;
            w.job_id = Some(job_id);
            w.last_heartbeat = format_millis(now_ms);
        }
    }

    /// Records a failed attempt: the job stays active, RETRYING, with the error.
    pub fn attempt_failed(&self, job_id: u64, error: String) {
        if let Some(job) = self.lock().active.get_mut(&job_id) {
            job.status = JobStatus::Retrying;
            job.error = Some(error);
        }
    }

    /// Removes a job that turned out to have nothing to do here (no partition of its slot is
    /// assigned to this process), without logging it.
    pub fn discard(&self, job_id: u64) {
        self.lock().active.remove(&job_id);
    }

    /// Finishes a job, DONE or ERROR, moving it to the log; returns its duration.
    pub fn finish(
        &self,
        job_id: u64,
        counts: JobCounts,
        error: Option<String>,
        now_ms: i64,
    ) -> Option<Job> {
        let mut inner = self.lock();
        let mut job = inner.active.remove(&job_id)?;
        job.status = if error.is_some() {
            JobStatus::Error
        } else {
            JobStatus::Done
        };
        job.counts = counts;
        job.error = error;
        job.finished_at = Some(format_millis(now_ms));
        job.duration_ms = job.started_ms.map(|s| now_ms - s);
        for worker in &job.workers {
            if let Some(w) = inner.workers.get_mut(worker) {
                w.status = WorkerStatus::Idle;
                w.job_id = None;
                w.jobs_done += 1;
                w.last_heartbeat = format_millis(now_ms);
            }
        }
        inner.log.push_front(job.clone());
        inner.log.truncate(LOG_CAPACITY);
        Some(job)
    }

    pub fn join(&self, worker: &str, now_ms: i64) {
        self.lock().workers.insert(
            worker.to_string(),
            Worker {
                worker_id: worker.to_string(),
                join_time: format_millis(now_ms),
                last_heartbeat: format_millis(now_ms),
                status: WorkerStatus::Idle,
                job_id: None,
                jobs_done: 0,
            },
        );
    }

    pub fn heartbeat(&self, worker: &str, now_ms: i64) {
        if let Some(w) = self.lock().workers.get_mut(worker) {
            w.last_heartbeat = format_millis(now_ms);
        }
    }

    pub fn leave(&self, worker: &str) {
        self.lock().workers.remove(worker);
    }

    /// Active jobs (READY and WORKING), oldest first.
    pub fn queue(&self) -> Vec<Job> {
        self.lock().active.values().cloned().collect()
    }

    /// Finished jobs, newest first.
    pub fn log(&self) -> Vec<Job> {
        self.lock().log.iter().cloned().collect()
    }

    pub fn workers(&self) -> BTreeMap<String, Worker> {
        self.lock().workers.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_goes_ready_working_done_and_into_the_log() {
        let b = Board::default();
        b.join("w1", 0);
        let spec = JobSpec {
            kind: JobKind::Sweep,
            level: 1,
            window: Some(7),
            slot_topic: "__SM_SLICE_4000MS_1".into(),
            bounds: Some((28_000, 32_000)),
            sweep_at: Some(27_000),
        };
        let id = b.create(spec, 1);
        assert_eq!(b.queue()[0].status, JobStatus::Ready);
        b.start(id, "w1", vec![0, 1], 27_000);
        assert_eq!(b.queue()[0].status, JobStatus::Working);
        assert_eq!(b.workers()["w1"].job_id, Some(id));
        let counts = JobCounts {
            records: 3,
            to_timer: 3,
            ..Default::default()
        };
        let done = b.finish(id, counts, None, 27_050).unwrap();
        assert_eq!((done.status, done.duration_ms), (JobStatus::Done, Some(50)));
        assert!(b.queue().is_empty());
        assert_eq!(b.log()[0].job_id, id);
        assert_eq!(b.workers()["w1"].status, WorkerStatus::Idle);
        let json = serde_json::to_value(&b.log()[0]).unwrap();
        assert_eq!(json["status"], "DONE");
        assert_eq!(json["records"], 3);
        assert_eq!(json["lower"], "1970-01-01T00:00:28.000Z");
    }
}
