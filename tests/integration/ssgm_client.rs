//! The SSGM client of the library against the real mock binary: grant, busy, request
//! error, timeouts, stray-grant release, garbage and failed releases.

use std::time::Duration;

use crate::harness::MockSsgm;
use orchgpu::scheduler::{AllocReply, CallFiles, GpuScheduler, SchedulerError, Ssgm, SsgmConfig};

const MOCK: &str = env!("CARGO_BIN_EXE_mock-ssgm");

fn start() -> MockSsgm {
    MockSsgm::start(2).expect("mock-ssgm serve")
}

fn cli(s: &MockSsgm, args: &[&str]) -> String {
    String::from_utf8_lossy(&s.client(args).expect("run").stdout).into_owned()
}

fn stat(s: &MockSsgm, name: &str) -> u64 {
    s.stat(name).expect("stat")
}

#[tokio::test]
async fn ssgm_against_mock() {
    let server = start();
    let dir = tempfile::tempdir().expect("dir");
    let mut config = SsgmConfig::new(MOCK, "127.0.0.1", server.port);
    config.call_timeout = Duration::from_millis(700);
    config.scratch_dir = dir.path().to_path_buf();
    let ssgm = Ssgm::new(config);
    let call = CallFiles::in_dir(dir.path(), "call");

    let AllocReply::Granted(grant) = GpuScheduler::alloc(&ssgm, 2, &call).await.expect("alloc")
    else {
        panic!("not granted");
    };
    assert_eq!(grant.setting("RCUDA_DEVICE_COUNT"), Some("2"));
    assert_eq!(ssgm.alloc(1, &call).await.expect("busy"), AllocReply::Busy);
    assert!(matches!(
        ssgm.alloc(3, &call).await,
        Ok(AllocReply::RequestError { .. })
    ));
    ssgm.dealloc(&grant.scheduler_job_id)
        .await
        .expect("dealloc");

    cli(&server, &["-inject", "hang"]);
    assert!(ssgm.alloc(1, &call).await.expect_err("hang").is_timeout());
    assert_eq!(stat(&server, "live"), 0);

    // Granted but never printed: nothing in the output names it (a scheduler-side leak
    // no client can see).
    cli(&server, &["-inject", "grant-then-hang"]);
    let err = ssgm.alloc(1, &call).await.expect_err("hang");
    assert!(matches!(err, SchedulerError::Timeout { .. }), "{err:?}");
    assert_eq!(stat(&server, "live"), 1);
    cli(&server, &["-reset"]);

    // Printed, then hung: the error names the job to release.
    cli(&server, &["-inject", "print-then-hang"]);
    let err = ssgm.alloc(1, &call).await.expect_err("hang");
    assert!(err.is_timeout(), "{err:?}");
    let SchedulerError::StrayGrant { job, .. } = &err else {
        panic!("expected StrayGrant, got {err:?}");
    };
    assert_eq!(stat(&server, "live"), 1);
    ssgm.dealloc(job).await.expect("release the stray grant");
    assert_eq!(stat(&server, "live"), 0);

    cli(&server, &["-inject", "exit"]);
    let err = ssgm.alloc(1, &call).await.expect_err("exit 1");
    assert!(
        matches!(&err, SchedulerError::StrayGrant { source, .. }
            if matches!(**source, SchedulerError::Failed { .. })),
        "{err:?}"
    );
    assert_eq!(stat(&server, "live"), 0);

    cli(&server, &["-inject", "garbage"]);
    assert!(matches!(
        ssgm.alloc(1, &call).await,
        Err(SchedulerError::BadReply { .. })
    ));
    cli(&server, &["-inject", "empty"]);
    assert!(matches!(
        ssgm.alloc(1, &call).await,
        Err(SchedulerError::BadReply { .. })
    ));

    let AllocReply::Granted(grant) = ssgm.alloc(1, &call).await.expect("alloc") else {
        panic!("not granted");
    };
    cli(&server, &["-inject", "fail-release", "-n", "1"]);
    let err = ssgm
        .dealloc(&grant.scheduler_job_id)
        .await
        .expect_err("one attempt, refused");
    assert!(
        matches!(
            err,
            SchedulerError::Failed {
                action: "-dealloc",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(stat(&server, "live"), 1);
    ssgm.dealloc(&grant.scheduler_job_id)
        .await
        .expect("second attempt");
    assert_eq!(stat(&server, "live"), 0);
}
