//! A job's id: derived from the identity of the object it runs on, so every delivery,
//! restart and daemon names the same object version the same way.

use std::fmt;

use sha2::{Digest, Sha256};

use super::event::ObjectRef;

/// A job's id: derived from the object's identity, so the same object version always
/// maps to the same id (and the same result key), across deliveries, restarts and
/// daemons.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(String);

impl JobId {
    /// `sha256(bucket, key, version or ETag)` cut to 20 hex digits (80 bits): short enough
    /// for file names, long enough that two objects never share one in practice. The
    /// event's `sequencer` is not used: LocalStack sends the same one for every event.
    pub fn derive(object: &ObjectRef) -> JobId {
        let mut hasher = Sha256::new();
        let identity = object
            .version_id
            .as_deref()
            .or(object.etag.as_deref())
            .unwrap_or("");
        for part in [object.bucket.as_str(), object.key.as_str(), identity] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
        JobId(hex)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, etag: Option<&str>, version: Option<&str>) -> ObjectRef {
        ObjectRef {
            bucket: "in".into(),
            key: key.into(),
            size: Some(1),
            etag: etag.map(str::to_string),
            version_id: version.map(str::to_string),
            event_name: "ObjectCreated:Put".into(),
            event_time: None,
        }
    }

    #[test]
    fn job_id_is_stable_and_depends_on_identity() {
        let a = JobId::derive(&object("a b.jpg", Some("e1"), None));
        assert_eq!(a, JobId::derive(&object("a b.jpg", Some("e1"), None)));
        assert_eq!(a.as_str().len(), 20);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, JobId::derive(&object("a b.jpg", Some("e2"), None)));
        assert_ne!(a, JobId::derive(&object("a+b.jpg", Some("e1"), None)));
        // A version id, when present, identifies the object version better than the ETag.
        assert_eq!(
            JobId::derive(&object("k", Some("e1"), Some("v1"))),
            JobId::derive(&object("k", Some("e2"), Some("v1")))
        );
    }

    #[test]
    fn job_id_fields_cannot_run_into_each_other() {
        let mut left = object("ab", Some("c"), None);
        left.bucket = "x".into();
        let mut right = object("a", Some("bc"), None);
        right.bucket = "x".into();
        assert_ne!(JobId::derive(&left), JobId::derive(&right));
    }
}
