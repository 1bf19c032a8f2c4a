//! S3 event notifications as they arrive in SQS message bodies.
//!
//! This module owns turning one message body into a [`Notification`]: the
//! `ObjectCreated` records as [`ObjectRef`]s with fully decoded keys, the
//! `s3:TestEvent` S3 sends when a notification is configured, a short reason
//! why the body can never become a job, or why an S3 event that may name a job
//! cannot be processed by this version (an unknown `eventVersion`, a record with a
//! missing or malformed field): such a message must not be dropped silently. It unwraps SNS envelopes, checks the
//! `eventVersion` major and accepts the key encodings of AWS, LocalStack and moto.
//!
//! A record whose key names no object (empty, or a "folder" ending in `/`, such as `/`,
//! `//` or `%2F`) is never a job and never becomes a request: a body made only of such
//! records is `NotAnEvent` (the caller deletes it), and beside real objects they are
//! skipped. Hostile keys (control characters, kilobytes of text) reach a reason only
//! escaped and cut to `EXCERPT_CHARS`.
//!
//! It is pure: no tokio, no AWS SDK types, no I/O. Deciding what to do with a
//! message (delete it, start a job, log the reason) is left to the caller.

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Longest excerpt of input text quoted in a [`Notification::NotAnEvent`] reason.
const EXCERPT_CHARS: usize = 80;

/// Most distinct skipped event names listed in a reason.
const MAX_NAMES: usize = 3;

/// One uploaded object named by a notification record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// Bucket name, as sent.
    pub bucket: String,
    /// Object key, fully decoded (see [`decode_event_key`]).
    pub key: String,
    /// Object size in bytes, when the sender includes it.
    pub(crate) size: Option<u64>,
    /// Entity tag as given, with surrounding quotes stripped if any.
    pub(crate) etag: Option<String>,
    /// Version id, present only for versioned buckets.
    pub(crate) version_id: Option<String>,
    /// Event name exactly as sent, e.g. `ObjectCreated:Put`.
    pub(crate) event_name: String,
    /// Event time as sent (ISO 8601), not parsed.
    pub(crate) event_time: Option<String>,
}

/// What one SQS message body means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// At least one `ObjectCreated` record. Non-`ObjectCreated` records in the same
    /// message are skipped (count returned).
    Objects {
        /// The `ObjectCreated` records, in message order.
        objects: Vec<ObjectRef>,
        /// How many other records were skipped: not `ObjectCreated` (e.g.
        /// `ObjectRemoved:Delete`), or `ObjectCreated` for a key that names no object
        /// (empty, or a folder ending in `/`).
        skipped: usize,
    },
    /// The `s3:TestEvent` S3 sends when a notification is configured.
    TestEvent,
    /// Anything that can never become a job; the String is a short human reason,
    /// e.g. `no Records` or `not JSON`.
    NotAnEvent(String),
    /// An S3 event that may name a job but that this version cannot process, e.g.
    /// `unsupported eventVersion 3.0` or `record 0: missing s3.bucket.name`. Not to be
    /// dropped: it may be a job after an upgrade, or an operator may replay it.
    Unprocessable(String),
}

/// Classify an SQS message body. Never panics, never errors: every input maps to a variant.
#[must_use]
pub fn parse_notification(body: &str) -> Notification {
    match classify_body(body) {
        Ok(notification) => notification,
        Err(Reject::Unprocessable(inner)) => Notification::Unprocessable(inner.to_string()),
        Err(reject) => Notification::NotAnEvent(reject.to_string()),
    }
}

/// Decode an S3 event key as a form value: `+` becomes a space first, then `%XX`
/// sequences are percent-decoded.
///
/// Invalid sequences such as `50%` or `%zz` are kept as they are. If the decoded
/// bytes are not valid UTF-8 the raw key is returned unchanged, because a lossy
/// replacement would name an object that does not exist.
#[must_use]
pub(crate) fn decode_event_key(raw: &str) -> String {
    // `+` must go first: a literal plus arrives as `%2B` and must survive.
    let spaced = raw.replace('+', " ");
    let bytes: Vec<u8> = percent_decode_str(&spaced).collect();
    String::from_utf8(bytes).unwrap_or_else(|_| raw.to_owned())
}

/// Why a body is not an event. Private: callers only see the rendered reason,
/// so causes are interpolated here rather than kept as `#[source]`.
#[derive(Debug, thiserror::Error)]
enum Reject {
    #[error("body is empty")]
    Empty,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is {0}, not an object")]
    NotObject(&'static str),
    #[error("SNS {0} message is not a Notification")]
    SnsType(String),
    #[error("SNS notification has no string Message")]
    SnsNoMessage,
    #[error("SNS Message is not JSON: {0}")]
    SnsNotJson(String),
    #[error("SNS Message is itself an SNS envelope")]
    SnsNested,
    #[error("unknown Event {0}")]
    UnknownEvent(String),
    #[error("no Records")]
    NoRecords,
    #[error("Records: {0}")]
    BadRecords(String),
    #[error("record {index}: {detail}")]
    BadRecord { index: usize, detail: String },
    #[error("record {index}: missing {field}")]
    Missing { index: usize, field: &'static str },
    #[error("unsupported eventVersion {0}")]
    Version(String),
    #[error("no ObjectCreated record ({count} skipped: {names})")]
    NoneCreated { count: usize, names: String },
    #[error("no object named: key {keys} is empty or a folder (ends in /)")]
    NoObjectKey { keys: String },
    /// A record of an S3 event that cannot be processed (see `Notification::Unprocessable`).
    #[error("{0}")]
    Unprocessable(Box<Reject>),
}

/// Top-level S3 event notification.
///
/// Records stay as JSON values here and are deserialized one at a time, so a bad
/// record is reported with its index.
///
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html>
#[derive(Deserialize)]
struct S3Event {
    #[serde(rename = "Records", default)]
    records: Vec<Value>,
}

/// One record of an S3 event; every field is optional so absence gets a precise reason.
///
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html>
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3EventRecord {
    event_version: Option<String>,
    event_name: Option<String>,
    event_time: Option<String>,
    s3: Option<S3Entity>,
}

/// The `s3` part of a record.
///
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html>
#[derive(Deserialize)]
struct S3Entity {
    bucket: Option<S3Bucket>,
    object: Option<S3Object>,
}

/// The `s3.bucket` part of a record.
///
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html>
#[derive(Deserialize)]
struct S3Bucket {
    name: Option<String>,
}

/// The `s3.object` part of a record; the key is decoded as it is read.
///
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html>
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3Object {
    #[serde(default, deserialize_with = "decoded_key")]
    key: Option<String>,
    size: Option<u64>,
    #[serde(rename = "eTag")]
    etag: Option<String>,
    version_id: Option<String>,
}

/// Deserializes `s3.object.key` through [`decode_event_key`].
fn decoded_key<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(de)?.map(|raw| decode_event_key(&raw)))
}

fn classify_body(body: &str) -> Result<Notification, Reject> {
    if body.trim().is_empty() {
        return Err(Reject::Empty);
    }
    let value: Value =
        serde_json::from_str(body).map_err(|e| Reject::NotJson(excerpt(&e.to_string())))?;
    classify_value(value, true)
}

/// Classifies parsed JSON; `allow_sns` is false inside an SNS envelope, since S3
/// never publishes an envelope inside another one.
fn classify_value(value: Value, allow_sns: bool) -> Result<Notification, Reject> {
    let Value::Object(map) = &value else {
        return Err(Reject::NotObject(json_kind(&value)));
    };
    // An S3 event never has a top-level `Type`; an SNS envelope always does.
    if let Some(kind) = map.get("Type").and_then(Value::as_str) {
        if !allow_sns {
            return Err(Reject::SnsNested);
        }
        if kind != "Notification" {
            return Err(Reject::SnsType(excerpt(kind)));
        }
        let message = map
            .get("Message")
            .and_then(Value::as_str)
            .ok_or(Reject::SnsNoMessage)?;
        let inner: Value = serde_json::from_str(message)
            .map_err(|e| Reject::SnsNotJson(excerpt(&e.to_string())))?;
        return classify_value(inner, false);
    }
    if let Some(event) = map.get("Event") {
        return match event.as_str() {
            Some("s3:TestEvent") => Ok(Notification::TestEvent),
            _ => Err(Reject::UnknownEvent(excerpt(&event.to_string()))),
        };
    }
    let event: S3Event =
        serde_json::from_value(value).map_err(|e| Reject::BadRecords(excerpt(&e.to_string())))?;
    classify_records(event.records)
}

fn classify_records(records: Vec<Value>) -> Result<Notification, Reject> {
    if records.is_empty() {
        return Err(Reject::NoRecords);
    }
    let mut objects = Vec::new();
    let mut skipped_names: Vec<String> = Vec::new();
    let mut folder_keys: Vec<String> = Vec::new();
    for (index, raw) in records.into_iter().enumerate() {
        // What is wrong with a record that looks like S3's may be a job we cannot read:
        // such a message must reach the dead-letter queue, not be deleted.
        let s3_like = looks_like_s3_record(&raw);
        let unprocessable = |reject: Reject| {
            if s3_like {
                Reject::Unprocessable(Box::new(reject))
            } else {
                reject
            }
        };
        let mut record: S3EventRecord = serde_json::from_value(raw).map_err(|e| {
            unprocessable(Reject::BadRecord {
                index,
                detail: excerpt(&e.to_string()),
            })
        })?;
        // A different major version may move or rename fields, so no record of
        // the message is trusted; a missing version is accepted.
        if let Some(version) = &record.event_version
            && version.split('.').next() != Some("2")
        {
            return Err(unprocessable(Reject::Version(excerpt(version))));
        }
        let name = record
            .event_name
            .take()
            .ok_or(unprocessable(Reject::Missing {
                index,
                field: "eventName",
            }))?;
        if is_object_created(&name) {
            let object = object_ref(index, name, record).map_err(unprocessable)?;
            if names_no_object(&object.key) {
                folder_keys.push(format!("{:?}", object.key));
            } else {
                objects.push(object);
            }
        } else {
            skipped_names.push(name);
        }
    }
    let skipped = skipped_names.len() + folder_keys.len();
    if objects.is_empty() && !folder_keys.is_empty() {
        return Err(Reject::NoObjectKey {
            keys: summarize_names(folder_keys),
        });
    }
    if objects.is_empty() {
        return Err(Reject::NoneCreated {
            count: skipped,
            names: summarize_names(skipped_names),
        });
    }
    Ok(Notification::Objects { objects, skipped })
}

/// Whether a record is S3's: its `eventSource`, an `s3` part or an S3 event name.
fn looks_like_s3_record(raw: &Value) -> bool {
    let source = raw.get("eventSource").and_then(Value::as_str);
    let name = raw.get("eventName").and_then(Value::as_str);
    source == Some("aws:s3")
        || raw.get("s3").is_some_and(Value::is_object)
        || name.is_some_and(|n| {
            let n = n.strip_prefix("s3:").unwrap_or(n);
            n.starts_with("ObjectCreated:") || n.starts_with("ObjectRemoved:")
        })
}

/// AWS and LocalStack send `ObjectCreated:Put`; some S3-compatible stores keep
/// the `s3:` prefix of the configuration's event type.
fn is_object_created(name: &str) -> bool {
    name.strip_prefix("s3:")
        .unwrap_or(name)
        .starts_with("ObjectCreated:")
}

/// Builds the [`ObjectRef`] of an `ObjectCreated` record; a missing bucket or key
/// rejects the whole message rather than silently dropping part of it.
fn object_ref(
    index: usize,
    event_name: String,
    record: S3EventRecord,
) -> Result<ObjectRef, Reject> {
    let missing = |field| Reject::Missing { index, field };
    let s3 = record.s3.ok_or(missing("s3"))?;
    let bucket = s3
        .bucket
        .and_then(|b| b.name)
        .filter(|name| !name.is_empty())
        .ok_or(missing("s3.bucket.name"))?;
    let object = s3.object.ok_or(missing("s3.object"))?;
    // An empty key is there but names no object: see `names_no_object`.
    let key = object.key.ok_or(missing("s3.object.key"))?;
    Ok(ObjectRef {
        bucket,
        key,
        size: object.size,
        etag: object
            .etag
            .map(|tag| tag.trim_matches('"').to_owned())
            .filter(|tag| !tag.is_empty()),
        version_id: object.version_id.filter(|id| !id.is_empty()),
        event_name,
        event_time: record.event_time,
    })
}

/// Whether a decoded key can name no input object: the empty key, or one ending in `/`
/// (what the S3 console creates as a "folder", `/`, `//`, `%2F` once decoded). Such a
/// record is never a job, and no request may be made for it: a GET of the empty key is
/// the bucket's listing on LocalStack (and, in virtual-hosted style, on AWS), whose
/// XML would otherwise be bundled and sent to the function as an input.
fn names_no_object(key: &str) -> bool {
    key.is_empty() || key.ends_with('/')
}

/// Lists the distinct names in first-seen order, at most [`MAX_NAMES`] of them.
fn summarize_names(names: Vec<String>) -> String {
    let mut distinct: Vec<String> = Vec::new();
    for name in names {
        if !distinct.contains(&name) {
            distinct.push(name);
        }
    }
    let more = distinct.len() > MAX_NAMES;
    distinct.truncate(MAX_NAMES);
    let mut out = distinct
        .iter()
        .map(|name| excerpt(name))
        .collect::<Vec<_>>()
        .join(", ");
    if more {
        out.push_str(", ...");
    }
    out
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "JSON null",
        Value::Bool(_) => "a JSON boolean",
        Value::Number(_) => "a JSON number",
        Value::String(_) => "a JSON string",
        Value::Array(_) => "a JSON array",
        Value::Object(_) => "a JSON object",
    }
}

/// Caps input-derived text quoted in a reason, counting chars so a multi-byte
/// character is never split.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AWS_PUT: &str = include_str!("../../tests/fixtures/events/aws_put.json");
    const LOCALSTACK_PUT: &str = include_str!("../../tests/fixtures/events/localstack_put.json");
    const MOTO_PUT: &str = include_str!("../../tests/fixtures/events/moto_put.json");
    const TEST_EVENT: &str = include_str!("../../tests/fixtures/events/test_event.json");
    const SNS_WRAPPED: &str = include_str!("../../tests/fixtures/events/sns_wrapped.json");
    const MULTI_RECORD: &str = include_str!("../../tests/fixtures/events/multi_record.json");

    /// Returns the objects of a body that must classify as `Objects`.
    fn objects(body: &str) -> (Vec<ObjectRef>, usize) {
        match parse_notification(body) {
            Notification::Objects { objects, skipped } => (objects, skipped),
            other => panic!("expected Objects, got {other:?}"),
        }
    }

    /// Returns the reason of a body that must classify as `NotAnEvent`.
    fn reason(body: &str) -> String {
        match parse_notification(body) {
            Notification::NotAnEvent(reason) => reason,
            other => panic!("expected NotAnEvent, got {other:?}"),
        }
    }

    /// Returns the reason of a body that must classify as `Unprocessable`.
    fn unprocessable(body: &str) -> String {
        match parse_notification(body) {
            Notification::Unprocessable(reason) => reason,
            other => panic!("expected Unprocessable, got {other:?}"),
        }
    }

    /// A minimal one-record body with the given raw key.
    fn with_key(raw_key: &str) -> String {
        serde_json::json!({"Records": [{
            "eventVersion": "2.1",
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "b"}, "object": {"key": raw_key, "size": 1}}
        }]})
        .to_string()
    }

    fn key_of(raw_key: &str) -> String {
        let (objects, _) = objects(&with_key(raw_key));
        assert_eq!(objects.len(), 1);
        objects[0].key.clone()
    }

    #[test]
    fn aws_documentation_sample() {
        let (objects, skipped) = objects(AWS_PUT);
        assert_eq!(skipped, 0);
        assert_eq!(
            objects,
            vec![ObjectRef {
                bucket: "amzn-s3-demo-bucket".into(),
                key: "HappyFace.jpg".into(),
                size: Some(1024),
                etag: Some("d41d8cd98f00b204e9800998ecf8427e".into()),
                version_id: Some("096fKKXTRTtl3on89fVO.nfljtsv6qko".into()),
                event_name: "ObjectCreated:Put".into(),
                event_time: Some("1970-01-01T00:00:00.000Z".into()),
            }]
        );
    }

    #[test]
    fn localstack_put_decodes_percent_space_and_plus() {
        let (objects, skipped) = objects(LOCALSTACK_PUT);
        assert_eq!(skipped, 0);
        let [object] = objects.as_slice() else {
            panic!("expected one object, got {objects:?}");
        };
        assert_eq!(object.bucket, "bucket");
        assert_eq!(object.key, "in/my photo+1.jpg");
        assert_eq!(object.size, Some(20481));
        assert_eq!(
            object.etag.as_deref(),
            Some("9b2cf535f27731c974343645a3985328")
        );
        assert_eq!(object.version_id, None);
        assert_eq!(object.event_name, "ObjectCreated:Put");
    }

    #[test]
    fn moto_put_decodes_slashes_and_has_no_etag() {
        let (objects, _) = objects(MOTO_PUT);
        let [object] = objects.as_slice() else {
            panic!("expected one object, got {objects:?}");
        };
        assert_eq!(object.bucket, "moto-bucket");
        assert_eq!(object.key, "in/sub dir/a.b.c.png");
        assert_eq!(object.size, Some(512));
        assert_eq!(object.etag, None);
    }

    #[test]
    fn test_event_fixture() {
        assert_eq!(parse_notification(TEST_EVENT), Notification::TestEvent);
    }

    #[test]
    fn sns_wrapped_event_is_unwrapped() {
        let (objects, skipped) = objects(SNS_WRAPPED);
        assert_eq!(skipped, 0);
        let [object] = objects.as_slice() else {
            panic!("expected one object, got {objects:?}");
        };
        assert_eq!(object.bucket, "amzn-s3-demo-bucket");
        assert_eq!(object.key, "in/Happy Face.jpg");
    }

    #[test]
    fn multi_record_keeps_created_and_counts_skipped() {
        let (objects, skipped) = objects(MULTI_RECORD);
        assert_eq!(skipped, 1);
        let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["in/run 1/input.tar.gz", "in/README"]);
        assert_eq!(
            objects[0].event_name,
            "ObjectCreated:CompleteMultipartUpload"
        );
        // The multipart ETag arrives quoted; the quotes are stripped.
        assert_eq!(
            objects[0].etag.as_deref(),
            Some("3858f62230ac3c915f300c664312c11f-9")
        );
        assert_eq!(objects[1].size, Some(0));
        assert_eq!(
            objects[1].version_id.as_deref(),
            Some("3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY")
        );
    }

    #[test]
    fn keys_with_spaces_as_plus_or_percent_20() {
        assert_eq!(key_of("my+photo.jpg"), "my photo.jpg");
        assert_eq!(key_of("my%20photo.jpg"), "my photo.jpg");
    }

    #[test]
    fn literal_plus_and_percent() {
        assert_eq!(key_of("a%2Bb.txt"), "a+b.txt");
        assert_eq!(key_of("100%25.txt"), "100%.txt");
        // Decoding is single-pass: `%252B` is a literal `%2B`, not a plus.
        assert_eq!(key_of("x%252B.txt"), "x%2B.txt");
    }

    #[test]
    fn unicode_key() {
        assert_eq!(key_of("caf%C3%A9+%F0%9F%93%B7.jpg"), "café 📷.jpg");
    }

    #[test]
    fn plain_key_shapes() {
        assert_eq!(key_of("Makefile"), "Makefile");
        assert_eq!(key_of("a.b.c.d.tar.gz"), "a.b.c.d.tar.gz");
        assert_eq!(
            key_of("in/2025/06/02/run%201/x.bin"),
            "in/2025/06/02/run 1/x.bin"
        );
    }

    #[test]
    fn invalid_percent_sequences_are_kept() {
        assert_eq!(decode_event_key("50%"), "50%");
        assert_eq!(decode_event_key("%zz+%4"), "%zz %4");
        assert_eq!(key_of("50%"), "50%");
    }

    #[test]
    fn invalid_utf8_after_decoding_keeps_raw_key() {
        assert_eq!(decode_event_key("bad%FF+name"), "bad%FF+name");
        assert_eq!(key_of("bad%FF+name"), "bad%FF+name");
    }

    #[test]
    fn not_json() {
        let why = reason("hello world");
        assert!(why.starts_with("body is not JSON: "), "{why}");
        assert_eq!(
            reason("{\"Records\": ["),
            "body is not JSON: EOF while parsing a list at line 1 column 13"
        );
    }

    #[test]
    fn empty_body() {
        assert_eq!(reason(""), "body is empty");
        assert_eq!(reason(" \n\t"), "body is empty");
    }

    #[test]
    fn json_that_is_not_an_object() {
        assert_eq!(reason("null"), "body is JSON null, not an object");
        assert_eq!(reason("[]"), "body is a JSON array, not an object");
        assert_eq!(reason("42"), "body is a JSON number, not an object");
        assert_eq!(reason("\"s3\""), "body is a JSON string, not an object");
    }

    #[test]
    fn object_without_records() {
        assert_eq!(reason("{}"), "no Records");
        assert_eq!(reason(r#"{"Records":[]}"#), "no Records");
        assert_eq!(
            reason(r#"{"Records":"x"}"#),
            "Records: invalid type: string \"x\", expected a sequence"
        );
    }

    #[test]
    fn created_record_without_s3_field() {
        let body = r#"{"Records":[{"eventVersion":"2.1","eventName":"ObjectCreated:Put"}]}"#;
        assert_eq!(unprocessable(body), "record 0: missing s3");
    }

    #[test]
    fn keys_that_name_no_object_are_never_jobs() {
        for (raw, shown) in [
            ("", r#""""#),
            ("/", r#""/""#),
            ("//", r#""//""#),
            ("%2F", r#""/""#),
            ("%2f%2F", r#""//""#),
            ("photos/", r#""photos/""#),
            ("photos%2F", r#""photos/""#),
            ("a+b/", r#""a b/""#),
        ] {
            assert_eq!(
                reason(&with_key(raw)),
                format!("no object named: key {shown} is empty or a folder (ends in /)"),
                "raw key {raw:?}"
            );
        }
        // Keys that only look like folders name objects.
        for raw in ["/a", "a/b", "%2Fx", "a%2Fb", "a/ ", "%2"] {
            assert_eq!(objects(&with_key(raw)).0.len(), 1, "raw key {raw:?}");
        }
        // Beside a real object, a folder record is skipped, the object kept.
        let mixed = serde_json::json!({"Records": [
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "%2F"}}},
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "in/x.jpg"}}},
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": ""}}}
        ]});
        let (found, skipped) = objects(&mixed.to_string());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "in/x.jpg");
        assert_eq!(skipped, 2);
        // In an SNS envelope too; a hostile key is escaped and cut in the reason.
        let inner = with_key("%0A%1B[31m/");
        let sns = serde_json::json!({"Type": "Notification", "Message": inner}).to_string();
        assert_eq!(
            reason(&sns),
            r#"no object named: key "\n\u{1b}[31m/" is empty or a folder (ends in /)"#
        );
        let long = format!("{}/", "x".repeat(500));
        assert!(reason(&with_key(&long)).len() < 200);
    }

    #[test]
    fn created_record_without_bucket_name_or_key_rejects_message() {
        let no_bucket = serde_json::json!({"Records": [
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}},
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {}, "object": {"key": "k"}}}
        ]});
        assert_eq!(
            unprocessable(&no_bucket.to_string()),
            "record 1: missing s3.bucket.name"
        );
        let no_key = serde_json::json!({"Records": [
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"size": 3}}}
        ]});
        assert_eq!(
            unprocessable(&no_key.to_string()),
            "record 0: missing s3.object.key"
        );
    }

    #[test]
    fn malformed_record_reports_index() {
        let body =
            r#"{"Records":[{"eventName":"ObjectCreated:Put","s3":{"object":{"size":"big"}}}]}"#;
        let why = unprocessable(body);
        assert!(why.starts_with("record 0: invalid type: string"), "{why}");
        assert_eq!(
            reason(r#"{"Records":[7]}"#),
            "record 0: invalid type: integer `7`, expected struct S3EventRecord"
        );
    }

    #[test]
    fn event_version_major_must_be_2() {
        let body = with_key("k").replace("\"2.1\"", "\"3.0\"");
        assert_eq!(unprocessable(&body), "unsupported eventVersion 3.0");
        // Records of another service are not S3's: never a job.
        let other = r#"{"Records":[{"eventVersion":"3.0","eventSource":"aws:ses","ses":{}}]}"#;
        assert_eq!(reason(other), "unsupported eventVersion 3.0");
        for version in ["2.0", "2.2", "2.3", "2"] {
            let body = with_key("k").replace("\"2.1\"", &format!("\"{version}\""));
            assert_eq!(objects(&body).0.len(), 1, "eventVersion {version}");
        }
        let body = with_key("k").replace("\"eventVersion\":\"2.1\",", "");
        assert!(!body.contains("eventVersion"));
        assert_eq!(objects(&body).0.len(), 1);
    }

    #[test]
    fn s3_prefixed_event_name_is_object_created() {
        let body = with_key("k").replace("\"ObjectCreated:Put\"", "\"s3:ObjectCreated:Copy\"");
        let (objects, _) = objects(&body);
        assert_eq!(objects[0].event_name, "s3:ObjectCreated:Copy");
    }

    #[test]
    fn only_non_created_records() {
        let body = serde_json::json!({"Records": [
            {"eventName": "ObjectRemoved:Delete", "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}},
            {"eventName": "ObjectRemoved:Delete", "s3": {"bucket": {"name": "b"}, "object": {"key": "j"}}}
        ]});
        assert_eq!(
            reason(&body.to_string()),
            "no ObjectCreated record (2 skipped: ObjectRemoved:Delete)"
        );
    }

    #[test]
    fn record_without_event_name() {
        let body = r#"{"Records":[{"eventVersion":"2.1","s3":{}}]}"#;
        assert_eq!(unprocessable(body), "record 0: missing eventName");
        assert_eq!(
            reason(r#"{"Records":[{"eventVersion":"2.1"}]}"#),
            "record 0: missing eventName"
        );
    }

    #[test]
    fn sns_with_non_json_message() {
        let body = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
            "Message": "hello"
        });
        let why = reason(&body.to_string());
        assert!(why.starts_with("SNS Message is not JSON: "), "{why}");
    }

    #[test]
    fn sns_wrapped_test_event() {
        let body = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
            "Subject": "Amazon S3 Notification",
            "Message": TEST_EVENT
        });
        assert_eq!(
            parse_notification(&body.to_string()),
            Notification::TestEvent
        );
    }

    #[test]
    fn sns_edge_cases() {
        let confirm = r#"{"Type":"SubscriptionConfirmation","Message":"You have chosen..."}"#;
        assert_eq!(
            reason(confirm),
            "SNS SubscriptionConfirmation message is not a Notification"
        );
        assert_eq!(
            reason(r#"{"Type":"Notification"}"#),
            "SNS notification has no string Message"
        );
        let nested = serde_json::json!({"Type": "Notification", "Message": SNS_WRAPPED});
        assert_eq!(
            reason(&nested.to_string()),
            "SNS Message is itself an SNS envelope"
        );
    }

    #[test]
    fn every_prefix_of_every_fixture_classifies_without_panicking() {
        for fixture in [
            AWS_PUT,
            LOCALSTACK_PUT,
            MOTO_PUT,
            TEST_EVENT,
            SNS_WRAPPED,
            MULTI_RECORD,
        ] {
            for (cut, _) in fixture.char_indices() {
                let _ = parse_notification(&fixture[..cut]);
            }
        }
    }

    #[test]
    fn unknown_event_field() {
        assert_eq!(
            reason(r#"{"Event":"s3:Other"}"#),
            "unknown Event \"s3:Other\""
        );
    }

    #[test]
    fn reasons_quote_at_most_an_excerpt() {
        let long = "x".repeat(10_000);
        let body = format!(r#"{{"Type":"{long}"}}"#);
        let why = reason(&body);
        assert!(why.len() < 150, "{why}");
        assert!(why.ends_with("... message is not a Notification"), "{why}");
        // Multi-byte characters are never split.
        assert_eq!(excerpt(&"é".repeat(100)), format!("{}...", "é".repeat(80)));
    }
}
