//! The integration tests' door to the test kit (`testkit/`, shared with the bench): the
//! kit bound to the binaries cargo built for this package, and the tests' shorthands
//! `Stack::new` and `MockSsgm::start` that use them.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use anyhow::Result;
pub use orchgpu_testkit::*;

/// The kit for this package's integration tests: the emulator of `ORCHGPU_TEST_ENDPOINT`
/// and the binaries cargo built for them, or those in `ORCHGPU_TEST_BIN_DIR` (to measure
/// another build side by side with the same test, as `BENCHMARKS.md` does for the claim).
pub fn kit() -> Kit {
    let bins = match std::env::var_os("ORCHGPU_TEST_BIN_DIR") {
        Some(dir) => Bins::in_dir(std::path::Path::new(&dir)),
        None => Bins {
            orchgpu: env!("CARGO_BIN_EXE_orchgpu").into(),
            mock_ssgm: env!("CARGO_BIN_EXE_mock-ssgm").into(),
            function: env!("CARGO_BIN_EXE_orchgpu-function").into(),
        },
    };
    Kit {
        endpoint: endpoint(),
        bins,
        repo: env!("CARGO_MANIFEST_DIR").into(),
    }
}

/// A file of the checkout.
pub fn repo_path(relative: &str) -> PathBuf {
    kit().repo_path(relative)
}

/// The kit's [`orchgpu_testkit::Stack`] on this package's binaries.
pub struct Stack(orchgpu_testkit::Stack);

impl Stack {
    /// A stack of its own for one test (see [`orchgpu_testkit::Stack::create`]).
    pub async fn new(name: &str, max_receive_count: u32) -> Result<Stack> {
        Ok(Stack(
            orchgpu_testkit::Stack::create(&kit(), name, Some(max_receive_count)).await?,
        ))
    }
}

impl Deref for Stack {
    type Target = orchgpu_testkit::Stack;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// The kit's [`orchgpu_testkit::MockSsgm`] on this package's `mock-ssgm`.
pub struct MockSsgm(orchgpu_testkit::MockSsgm);

impl MockSsgm {
    /// A mock SSGM server with `gpus` GPUs on a free loopback port.
    pub fn start(gpus: u32) -> Result<MockSsgm> {
        Ok(MockSsgm(orchgpu_testkit::MockSsgm::spawn(
            &kit().bins.mock_ssgm,
            gpus,
        )?))
    }
}

impl Deref for MockSsgm {
    type Target = orchgpu_testkit::MockSsgm;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for MockSsgm {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
