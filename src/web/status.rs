//! A job's state for the page, from what the history and S3 say. Pure: the caller reads
//! the history, the claim and the result, this decides what the user sees, and what of it
//! an uploader (who holds a handle, not the token) may see.

use serde::Serialize;

use crate::claim::ClaimSeen;
use crate::history::{JobDetail, JobSummary, Timestamp};

use super::names::{Detection, OutputKind};

/// A file the function wrote for a job: `<id><suffix>` in the output location.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct OutputFile {
    /// What follows the job id, e.g. `.png`; checked by `names::is_output_suffix`.
    pub suffix: String,
    pub kind: OutputKind,
    pub bytes: u64,
}

/// What the page shows of one job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct JobView {
    pub job_id: String,
    /// The input's key, when the history knows it (operators only).
    pub key: Option<String>,
    /// `queued`, `received`, `waiting_for_gpus`, `running`, `running_elsewhere`, `done`,
    /// `failed`, `retrying` or `dropped`.
    pub state: &'static str,
    /// The state in words, for anyone: no bucket, key, owner or scheduler output.
    pub summary: String,
    /// Why it failed, was returned or dropped, as the daemon recorded it (operators only).
    pub reason: Option<String>,
    /// The scheduler's job id while (or since) it ran on GPUs (operators only).
    pub scheduler_job: Option<String>,
    /// The claim owner of a job running on another daemon (operators only).
    pub owner: Option<String>,
    /// Seconds in the current state: running, since the GPUs were granted; done, from the
    /// pick-up of the attempt that succeeded to its end, both from the history, and only
    /// once the history has recorded the end.
    pub seconds: Option<f64>,
    pub attempts: u32,
    /// Whether the result is in the output bucket.
    pub result: bool,
    /// The function's detections, when it wrote a detections file beside the result.
    pub detections: Option<Vec<Detection>>,
    /// Every file the function wrote for the job (the result included), once the result
    /// is there; empty when they could not be listed.
    pub outputs: Vec<OutputFile>,
    /// Whether nothing shown can change any more: the page stops asking then.
    #[serde(rename = "final")]
    pub is_final: bool,
}

impl JobView {
    /// What an uploader may see of their own job: the state in words and the figures,
    /// without the key, the daemon's error text, the claim owner or the scheduler's job.
    pub(crate) fn for_uploader(self) -> JobView {
        JobView {
            key: None,
            reason: None,
            scheduler_job: None,
            owner: None,
            ..self
        }
    }
}

/// What S3 says about a job.
#[derive(Debug, Clone, Default)]
pub(crate) struct S3View {
    pub result: bool,
    pub claim: Option<ClaimSeen>,
    pub detections: Option<Vec<Detection>>,
    pub outputs: Vec<OutputFile>,
}

/// Whether the history's word on a job is one that S3 need not be asked about: this
/// daemon has it in hand (received, waiting, running), so neither its result nor a claim
/// of another daemon can be there yet that the history will not tell.
pub(crate) fn history_in_hand(history: Option<&JobDetail>) -> bool {
    matches!(
        history.map(|h| h.job.state.as_str()),
        Some("received" | "waiting_for_gpus")
    )
}

/// One job's view from its history (if any) and S3's.
pub(crate) fn job_view(
    job_id: &str,
    history: Option<&JobDetail>,
    s3: S3View,
    now: Timestamp,
) -> JobView {
    let mut view = JobView {
        job_id: job_id.to_string(),
        key: history.map(|h| h.job.key.clone()),
        state: "queued",
        summary: "Uploaded; waiting in the queue for a daemon.".to_string(),
        reason: None,
        scheduler_job: None,
        owner: None,
        seconds: None,
        attempts: history.map_or(0, |h| h.job.attempts),
        result: s3.result,
        detections: s3.detections,
        outputs: s3.outputs,
        is_final: false,
    };
    let latest = |kind: &str| {
        history.and_then(|h| {
            h.timeline
                .iter()
                .rev()
                .take_while(|e| e.attempt == h.job.attempts)
                .find(|e| e.kind == kind)
        })
    };
    // The latest grant of the latest attempt: which scheduler job, since when.
    let granted = latest("granted");
    view.scheduler_job =
        granted.and_then(|e| e.detail.get("scheduler_job")?.as_str().map(str::to_owned));
    let live_claim = s3.claim.as_ref().filter(|c| c.live);
    let state = history.map(|h| h.job.state.as_str());
    if s3.result {
        view.state = "done";
        view.summary = "Done.".to_string();
        match state {
            Some("done") => {
                // From this attempt's pick-up to its end, both recorded.
                let start = latest("received");
                let end = latest("deleted");
                view.seconds = start.zip(end).map(|(s, e)| secs(s.at, e.at));
                view.is_final = true;
            }
            // Nothing more will be recorded here: another daemon ran it, or its message
            // was dropped as a duplicate of a job already done.
            None | Some("dropped" | "failed") => {
                view.scheduler_job = None;
                view.is_final = true;
            }
            // The result is there before the history has recorded the end: the figures
            // are not final yet.
            Some(_) => {
                view.summary = "Done; the daemon is finishing the job.".to_string();
            }
        }
        return view;
    }
    match (state, live_claim) {
        (Some("running"), _) => {
            view.state = "running";
            view.seconds = granted.map(|e| secs(e.at, now));
            view.summary = "Running on a GPU.".to_string();
        }
        (Some("waiting_for_gpus"), _) => {
            view.state = "waiting_for_gpus";
            view.summary = "Waiting for GPUs: the scheduler is busy.".to_string();
            view.scheduler_job = None;
        }
        (Some("received"), _) => {
            view.state = "received";
            view.summary = "Picked up; asking the scheduler for GPUs.".to_string();
            view.scheduler_job = None;
        }
        (Some("done"), _) => {
            // The history says done but the result is gone (removed since).
            view.state = "done";
            view.summary = "Done (the result is no longer in the output bucket).".to_string();
            view.is_final = true;
        }
        // This daemon claimed it; its history has not caught up yet.
        (None | Some("returned" | "failed"), Some(claim)) if claim.mine => {
            view.state = "received";
            view.summary = "Picked up; asking the scheduler for GPUs.".to_string();
            view.scheduler_job = None;
        }
        (None | Some("returned" | "failed"), Some(claim)) => {
            view.state = "running_elsewhere";
            view.summary = "Running on another daemon.".to_string();
            view.owner = Some(claim.owner.clone());
            view.scheduler_job = None;
        }
        (Some("returned"), None) => {
            view.state = "retrying";
            view.reason = history.and_then(|h| h.job.last_reason.clone());
            view.summary = "Failed; it will be retried.".to_string();
        }
        (Some("failed"), None) => {
            view.state = "failed";
            view.reason = history.and_then(|h| h.job.last_reason.clone());
            view.summary = "Failed.".to_string();
            view.is_final = true;
        }
        (Some("dropped"), _) => {
            view.state = "dropped";
            view.reason = history.and_then(|h| h.job.last_reason.clone());
            view.summary = "Dropped: it can never become a job.".to_string();
            view.is_final = true;
        }
        (None, None) | (Some(_), _) => {}
    }
    view
}

/// A recent job as listed (history only: no S3 request per row).
pub(crate) fn summary_view(job: &JobSummary) -> serde_json::Value {
    serde_json::json!({
        "job_id": job.job_id,
        "key": job.key,
        "state": job.state,
        "attempts": job.attempts,
        "first_seen": job.first_seen,
        "last_update": job.last_update,
        "reason": job.last_reason,
    })
}

fn secs(from: Timestamp, to: Timestamp) -> f64 {
    (to.0.saturating_sub(from.0)).max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::EventRecord;

    fn detail(state: &str, events: &[(&str, serde_json::Value)]) -> JobDetail {
        JobDetail {
            job: JobSummary {
                job_id: "0123456789abcdef0123".into(),
                bucket: "in".into(),
                key: "web/dog.jpg".into(),
                state: state.into(),
                attempts: 1,
                first_seen: Timestamp(1_000),
                last_update: Timestamp(8_500),
                last_reason: Some("the function wrote no result within 90 s".into()),
                gpu_seconds: None,
            },
            message_id: None,
            attempt_outcomes: Vec::new(),
            timeline: events
                .iter()
                .enumerate()
                .map(|(i, (kind, detail))| EventRecord {
                    attempt: 1,
                    at: Timestamp(1_000 + 1_000 * i as i64),
                    kind: (*kind).into(),
                    message_id: None,
                    detail: detail.clone(),
                })
                .collect(),
        }
    }

    fn view(history: Option<&JobDetail>, s3: S3View) -> JobView {
        job_view("0123456789abcdef0123", history, s3, Timestamp(10_000))
    }

    fn claim(live: bool) -> Option<ClaimSeen> {
        Some(ClaimSeen {
            live,
            mine: false,
            owner: "other:42 (started 1)".into(),
        })
    }

    #[test]
    fn unknown_to_history_and_s3_is_queued() {
        assert_eq!(view(None, S3View::default()).state, "queued");
        assert_eq!(
            view(
                None,
                S3View {
                    claim: claim(false),
                    ..S3View::default()
                }
            )
            .state,
            "queued"
        );
    }

    #[test]
    fn a_live_claim_of_another_daemon_is_running_elsewhere() {
        let v = view(
            None,
            S3View {
                claim: claim(true),
                ..S3View::default()
            },
        );
        assert_eq!(v.state, "running_elsewhere");
        assert_eq!(v.owner.as_deref(), Some("other:42 (started 1)"));
        let shown = v.clone().for_uploader();
        assert_eq!(shown.owner, None);
        assert!(!shown.summary.contains("other:42"), "{}", shown.summary);
        let mut own = claim(true);
        if let Some(c) = own.as_mut() {
            c.mine = true;
        }
        let v = view(
            None,
            S3View {
                claim: own,
                ..S3View::default()
            },
        );
        assert_eq!(v.state, "received", "its own claim is no other daemon");
        let returned = detail("returned", &[("received", serde_json::json!({}))]);
        let v = view(
            Some(&returned),
            S3View {
                claim: claim(true),
                ..S3View::default()
            },
        );
        assert_eq!(v.state, "running_elsewhere");
    }

    #[test]
    fn running_names_the_scheduler_job_and_how_long() {
        let running = detail(
            "running",
            &[
                ("received", serde_json::json!({"receive_count": 1})),
                (
                    "granted",
                    serde_json::json!({"scheduler_job": "77", "devices": []}),
                ),
            ],
        );
        let v = view(Some(&running), S3View::default());
        assert_eq!(v.state, "running");
        assert_eq!(v.scheduler_job.as_deref(), Some("77"));
        assert_eq!(v.seconds, Some(8.0));
        assert!(!v.is_final);
        assert!(!v.summary.contains("77"), "{}", v.summary);
        assert_eq!(v.for_uploader().scheduler_job, None);
    }

    #[test]
    fn a_result_before_the_history_ends_is_done_but_not_final() {
        // The result reached S3 before the history recorded the end: no figures yet.
        let running = detail(
            "running",
            &[
                ("received", serde_json::json!({"receive_count": 1})),
                ("granted", serde_json::json!({"scheduler_job": "77"})),
            ],
        );
        let with_result = S3View {
            result: true,
            ..S3View::default()
        };
        let v = view(Some(&running), with_result.clone());
        assert_eq!(v.state, "done");
        assert_eq!(v.seconds, None);
        assert!(!v.is_final);
        // Unknown to this history (another daemon ran it): done, and nothing will follow.
        let v = view(None, with_result.clone());
        assert_eq!((v.state, v.is_final, v.seconds), ("done", true, None));
    }

    #[test]
    fn a_done_job_takes_from_its_own_pick_up_to_its_own_end() {
        // Attempt 1 failed, attempt 2 received at 5 s and deleted at 9.5 s; the summary's
        // first_seen (1 s) and last_update (8.5 s) are not the figures.
        let mut done = detail("done", &[]);
        done.job.attempts = 2;
        done.timeline = [
            (1, 1_000, "received"),
            (1, 2_000, "returned"),
            (2, 5_000, "received"),
            (2, 6_000, "granted"),
            (2, 9_000, "released"),
            (2, 9_500, "deleted"),
        ]
        .into_iter()
        .map(|(attempt, at, kind)| EventRecord {
            attempt,
            at: Timestamp(at),
            kind: kind.into(),
            message_id: None,
            detail: serde_json::json!({}),
        })
        .collect();
        let v = view(
            Some(&done),
            S3View {
                result: true,
                ..S3View::default()
            },
        );
        assert_eq!((v.state, v.is_final, v.seconds), ("done", true, Some(4.5)));
    }

    #[test]
    fn failures_say_why() {
        for (state, shown) in [
            ("failed", "failed"),
            ("returned", "retrying"),
            ("dropped", "dropped"),
        ] {
            let v = view(Some(&detail(state, &[])), S3View::default());
            assert_eq!(v.state, shown);
            assert_eq!(
                v.reason.as_deref(),
                Some("the function wrote no result within 90 s")
            );
            assert_eq!(v.is_final, state != "returned", "{state}");
            // An uploader sees the state in words, not the daemon's error text.
            let shown = v.for_uploader();
            assert_eq!(shown.reason, None);
            assert!(!shown.summary.contains("90 s"), "{}", shown.summary);
        }
        let waiting = view(Some(&detail("waiting_for_gpus", &[])), S3View::default());
        assert_eq!(waiting.state, "waiting_for_gpus");
    }
}
