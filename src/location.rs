//! Places in S3: a bucket and a dir in it (`bucket/dir`), as the intermediate, output,
//! claims and upload locations are given. Parsing them from flags is `cli`'s.

/// A `bucket/dir` location; `dir` is empty for the bucket's root and never has a leading
/// or trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketDir {
    pub bucket: String,
    pub dir: String,
}

impl BucketDir {
    /// The key of `name` inside this location.
    pub fn key_for(&self, name: &str) -> String {
        if self.dir.is_empty() {
            name.to_string()
        } else {
            format!("{}/{}", self.dir, name)
        }
    }
}

impl std::fmt::Display for BucketDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.dir)
    }
}
