//! The page's secrets, derived with one key drawn at start: the session cookie a token
//! holder gets, and the handle an upload gets. Pure apart from drawing the key.
//!
//! - A session value is `<expiry>.<HMAC(key, "session" ‖ expiry ‖ token)>`: it proves
//!   the token was presented before, without carrying it; it ends at its expiry or when
//!   the daemon restarts (a new key), and a changed token ends it too.
//! - A handle is `<job id><HMAC(key, "handle" ‖ job id), first 128 bits>`: job ids come
//!   from object keys and ETags, so they are no secret; a handle is, and only its
//!   uploader got it. It needs no table (nothing to fill up), and like a session it ends
//!   with the daemon's run.
//!
//! Hostile input: a forged or altered value fails the MAC (compared in constant time);
//! a value of the wrong length or with non-hex characters is refused before any MAC; an
//! expired session is refused whatever its MAC.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::names::is_job_id;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Bytes of a handle's MAC (128 bits).
const HANDLE_MAC: usize = 16;
/// Characters of a handle: a job id and its MAC in hex.
pub(crate) const HANDLE_LEN: usize = 20 + 2 * HANDLE_MAC;

/// The per-start key.
#[derive(Clone)]
pub(crate) struct Keys {
    key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// A new random key from the operating system.
    ///
    /// # Errors
    /// The operating system's random source failed.
    pub(crate) fn random() -> Result<Keys, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Keys { key })
    }

    #[cfg(test)]
    pub(crate) fn fixed(key: [u8; 32]) -> Keys {
        Keys { key }
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in parts {
            // Length-prefixed, so that no two part lists give the same input.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The cookie value of a session that holds until `expires` (Unix seconds).
    pub(crate) fn session(&self, token: &str, expires: u64) -> String {
        let tag = self
            .mac(&[b"session", expires.to_string().as_bytes(), token.as_bytes()])
            .finalize()
            .into_bytes();
        format!("{expires}.{}", hex(&tag))
    }

    /// Whether `value` is a session this run made for `token`, still before its expiry at
    /// `now` (Unix seconds).
    pub(crate) fn session_valid(&self, value: &str, token: &str, now: u64) -> bool {
        let Some((expires, tag)) = value.split_once('.') else {
            return false;
        };
        let Ok(at) = expires.parse::<u64>() else {
            return false;
        };
        if at <= now || expires != at.to_string() {
            return false;
        }
        let Some(tag) = unhex(tag) else { return false };
        self.mac(&[b"session", expires.as_bytes(), token.as_bytes()])
            .verify_slice(&tag)
            .is_ok()
    }

    /// The handle of an upload whose job is `job_id`.
    pub(crate) fn handle(&self, job_id: &str) -> String {
        let tag = self
            .mac(&[b"handle", job_id.as_bytes()])
            .finalize()
            .into_bytes();
        format!("{job_id}{}", hex(&tag[..HANDLE_MAC]))
    }

    /// The job id a handle this run gave out stands for; `None` for anything else.
    pub(crate) fn job_of(&self, handle: &str) -> Option<String> {
        if handle.len() != HANDLE_LEN || !handle.is_ascii() {
            return None;
        }
        let (job_id, tag) = handle.split_at(20);
        if !is_job_id(job_id) {
            return None;
        }
        let tag = unhex(tag)?;
        self.mac(&[b"handle", job_id.as_bytes()])
            .verify_truncated_left(&tag)
            .ok()?;
        Some(job_id.to_string())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex only (what `hex` writes), else `None`.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";
    const JOB: &str = "0123456789abcdef0123";

    #[test]
    fn a_session_holds_for_its_token_until_its_expiry() {
        let keys = Keys::fixed([7; 32]);
        let value = keys.session(TOKEN, 2_000);
        assert!(keys.session_valid(&value, TOKEN, 1_999));
        assert!(!keys.session_valid(&value, TOKEN, 2_000), "expired");
        assert!(!keys.session_valid(&value, "another-token-0123456", 1_000));
        assert!(
            !Keys::fixed([8; 32]).session_valid(&value, TOKEN, 1_000),
            "another run's key"
        );
        assert!(
            !value.contains(TOKEN),
            "the cookie must not carry the token"
        );
    }

    #[test]
    fn altered_sessions_are_refused() {
        let keys = Keys::fixed([7; 32]);
        let value = keys.session(TOKEN, 2_000);
        let (_, tag) = value.split_once('.').expect("a dot");
        for forged in [
            format!("9999999999.{tag}"),
            format!("02000.{tag}"),
            format!("2000.{}", tag.to_uppercase()),
            format!("2000.{}", &tag[2..]),
            "2000.".to_string(),
            "2000".to_string(),
            String::new(),
            TOKEN.to_string(),
        ] {
            assert!(!keys.session_valid(&forged, TOKEN, 1_000), "{forged:?}");
        }
    }

    #[test]
    fn a_handle_stands_for_its_job_only() {
        let keys = Keys::fixed([7; 32]);
        let handle = keys.handle(JOB);
        assert_eq!(handle.len(), HANDLE_LEN);
        assert_eq!(keys.job_of(&handle).as_deref(), Some(JOB));
        assert_eq!(Keys::fixed([8; 32]).job_of(&handle), None);
        let other = "0123456789abcdef0124";
        let swapped = format!("{other}{}", &handle[20..]);
        assert_eq!(keys.job_of(&swapped), None);
        for bad in [
            JOB.to_string(),
            handle.to_uppercase(),
            format!("{handle}0"),
            handle[..HANDLE_LEN - 1].to_string(),
            format!("{}{}", &handle[..HANDLE_LEN - 1], "é"),
            "../../../../etc/passwd/../../../../../../../../../..".to_string(),
        ] {
            assert_eq!(keys.job_of(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn random_keys_differ() {
        let a = Keys::random().expect("random");
        let b = Keys::random().expect("random");
        assert_ne!(a.handle(JOB), b.handle(JOB));
    }
}
