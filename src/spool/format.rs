//! On-disk formats of the spool, versioned and self-validating.
//!
//! A queue file `queue/<id>.msg`:
//! ```text
//! MAILBRIDGE-QUEUE 1\n
//! STATE a=0000000001 n=001795819497316 f=1 c=1a2b3c4d\n    <- the attempt slot, fixed size
//! {"id":..., "sender":..., "recipients":[...], ...}\n      <- the envelope, one JSON line
//! <content: CRLF-clean message, our headers first>
//! \nMAILBRIDGE-END <content length> <crc32 of all but the slot and this trailer>\n
//! ```
//! Everything but the slot is written once and never changed. A file without a matching
//! trailer is incomplete or damaged (Postfix's "end record").
//!
//! The slot (attempts, next attempt time, in-flight flag, its own checksum) is overwritten in
//! place before each attempt: no new file, so the common case (delivered at the first attempt)
//! costs one file per message. A damaged slot only means "attempt state unknown".
//!
//! A state file `queue/<id>.state` is written only when an attempt leaves the message queued
//! (some recipients deferred), and in `failed/` with the final state: per-recipient status and replies, last error.
//! `MAILBRIDGE-STATE 1 <crc32 of the JSON>\n<JSON>\n`, replaced atomically (write to tmp/,
//! rename). When it is missing, every recipient is pending.
//!
//! The state JSON carries the typed outcomes ([`crate::outcome::Outcome`]: verdict, step,
//! reply code / enhanced status / text, problem key with meaning and remedy) in one table,
//! `outcomes`, each distinct outcome once: recipients (`recipients[].outcome`), the last
//! failure or deferral (`last_outcome`) and the attempt log (`history`, one per attempt, the
//! last [`HISTORY_MAX`]) refer to it by index. A 500-recipient message paused by one problem
//! stores its remedy text once, not 500 times. These fields are optional with serde
//! defaults, so a state file written before they existed (only `reply` and `last_error`
//! strings) still loads, and the version stays 1: an older mailbridge reading a newer file
//! ignores the fields it does not know.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;

pub const QUEUE_MAGIC: &[u8] = b"MAILBRIDGE-QUEUE 1\n";
pub const TRAILER_TAG: &[u8] = b"\nMAILBRIDGE-END ";
pub const STATE_MAGIC: &str = "MAILBRIDGE-STATE 1 ";

/// The attempt slot of a queue file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub in_flight: bool,
}

/// Byte offset of the slot in a queue file.
pub const SLOT_OFFSET: u64 = QUEUE_MAGIC.len() as u64;
/// Length of the slot line, newline included.
pub const SLOT_LEN: usize = 52;

impl Slot {
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let body = format!(
            "STATE a={:010} n={:015} f={}",
            self.attempts,
            self.next_attempt_ms.min(999_999_999_999_999),
            u8::from(self.in_flight)
        );
        let line = format!("{body} c={:08x}\n", crc32fast::hash(body.as_bytes()));
        let mut out = [b' '; SLOT_LEN];
        out.copy_from_slice(line.as_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Slot> {
        let text = std::str::from_utf8(b).ok()?.strip_suffix('\n')?;
        let (body, crc) = text.split_once(" c=")?;
        if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
            return None;
        }
        let mut it = body.strip_prefix("STATE ")?.split(' ');
        let attempts = it.next()?.strip_prefix("a=")?.parse().ok()?;
        let next_attempt_ms = it.next()?.strip_prefix("n=")?.parse().ok()?;
        let in_flight = it.next()?.strip_prefix("f=")? == "1";
        Some(Slot {
            attempts,
            next_attempt_ms,
            in_flight,
        })
    }
}

/// The envelope as received: never changes after the 250.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    /// Reverse-path; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub client_ip: IpAddr,
    pub helo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Arrival time, milliseconds since the Unix epoch.
    pub arrival_ms: u64,
    /// `BODY=` parameter as given (`7BIT`, `8BITMIME`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default)]
    pub smtputf8: bool,
    /// Deliver through this upstream regardless of routes (our own reports go back through
    /// the upstream that failed the message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// A report mailbridge generated (DSN or alert): never answered with another report.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub report: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RcptStatus {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptState {
    pub status: RcptStatus,
    /// The last reply or error for this recipient (upstream text, no secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The typed outcome of the last attempt for this recipient, as an index into
    /// [`State::outcomes`] (absent in files written before outcomes were stored, and before
    /// the first attempt). Read it with [`State::outcome_of`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<usize>,
}

/// The mutable part of a queue entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub attempts: u32,
    /// When the next attempt is due, milliseconds since the Unix epoch.
    pub next_attempt_ms: u64,
    /// Set while an attempt runs; found set at start-up it means the attempt was cut off
    /// and the message may reach the upstream twice.
    #[serde(default)]
    pub in_flight: bool,
    /// Held by an operator (`mailbridge queue hold`): never attempted until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// When an operator last moved it from `failed/` back into the queue
    /// (`mailbridge queue requeue`): `queue.max_age` counts from then, not from arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The distinct typed outcomes the fields below refer to (see the module comment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outcomes: Vec<Outcome>,
    /// The outcome behind `last_error` (the last failure or deferral of any recipient), an
    /// index into `outcomes`. Read it with [`State::last_outcome`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<usize>,
    /// One outcome per attempt, oldest first, the last [`HISTORY_MAX`]: indices into
    /// `outcomes`. Read it with [`State::history`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<usize>,
    pub recipients: Vec<RcptState>,
}

impl State {
    pub fn initial(envelope: &Envelope) -> State {
        State {
            attempts: 0,
            next_attempt_ms: envelope.arrival_ms,
            in_flight: false,
            held: false,
            requeued_ms: None,
            last_error: None,
            outcomes: Vec::new(),
            last_outcome: None,
            history: Vec::new(),
            recipients: envelope
                .recipients
                .iter()
                .map(|_| RcptState {
                    status: RcptStatus::Pending,
                    reply: None,
                    outcome: None,
                })
                .collect(),
        }
    }

    /// Recipient `i`'s outcome of its last attempt.
    pub fn outcome_of(&self, i: usize) -> Option<&Outcome> {
        self.recipients
            .get(i)?
            .outcome
            .and_then(|k| self.outcomes.get(k))
    }

    /// The last failure or deferral of any recipient.
    pub fn last_outcome(&self) -> Option<&Outcome> {
        self.last_outcome.and_then(|k| self.outcomes.get(k))
    }

    /// One outcome per attempt, oldest first (at most [`HISTORY_MAX`]).
    pub fn history(&self) -> impl Iterator<Item = &Outcome> + '_ {
        self.history.iter().filter_map(|&k| self.outcomes.get(k))
    }

    /// The table index of `o`, adding it if no equal outcome is there yet.
    fn intern(&mut self, o: Outcome) -> usize {
        match self.outcomes.iter().position(|x| *x == o) {
            Some(k) => k,
            None => {
                self.outcomes.push(o);
                self.outcomes.len() - 1
            }
        }
    }

    /// Records recipient `i`'s outcome.
    pub fn set_outcome(&mut self, i: usize, o: Outcome) {
        let k = self.intern(o);
        if let Some(r) = self.recipients.get_mut(i) {
            r.outcome = Some(k);
        }
        self.compact();
    }

    /// Records the outcome behind `last_error`.
    pub fn set_last_outcome(&mut self, o: Outcome) {
        self.last_outcome = Some(self.intern(o));
        self.compact();
    }

    /// Appends an attempt's outcome to the history (the oldest beyond [`HISTORY_MAX`] go).
    pub fn push_history(&mut self, o: Outcome) {
        let k = self.intern(o);
        self.history.push(k);
        if self.history.len() > HISTORY_MAX {
            let drop = self.history.len() - HISTORY_MAX;
            self.history.drain(..drop);
        }
        self.compact();
    }

    /// Drops table entries nothing refers to and renumbers the references; an index out of
    /// range (a file edited by hand) is dropped rather than failing the whole state.
    fn compact(&mut self) {
        let n = self.outcomes.len();
        let mut used = vec![false; n];
        let refs = self
            .recipients
            .iter()
            .filter_map(|r| r.outcome)
            .chain(self.last_outcome)
            .chain(self.history.iter().copied());
        for k in refs {
            if k < n {
                used[k] = true;
            }
        }
        let mut map = vec![None; n];
        let mut next = 0;
        for (k, u) in used.iter().enumerate() {
            if *u {
                map[k] = Some(next);
                next += 1;
            }
        }
        let remap = |k: usize| map.get(k).copied().flatten();
        for r in &mut self.recipients {
            r.outcome = r.outcome.and_then(remap);
        }
        self.last_outcome = self.last_outcome.and_then(remap);
        self.history = self.history.iter().filter_map(|&k| remap(k)).collect();
        let mut k = 0;
        self.outcomes.retain(|_| {
            k += 1;
            used[k - 1]
        });
    }

    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Pending)
            .map(|(i, _)| i)
    }
}

/// How many attempts the state journal's history keeps.
pub const HISTORY_MAX: usize = 20;

/// The bytes that start a queue file, and the checksum state over them (the slot is not
/// covered: it changes).
pub fn encode_header(envelope: &Envelope) -> (Vec<u8>, crc32fast::Hasher) {
    let mut out = QUEUE_MAGIC.to_vec();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(QUEUE_MAGIC);
    out.extend_from_slice(
        &Slot {
            attempts: 0,
            next_attempt_ms: envelope.arrival_ms,
            in_flight: false,
        }
        .encode(),
    );
    // Serializing plain data to a Vec cannot fail.
    let mut json = serde_json::to_vec(envelope).unwrap_or_default();
    json.push(b'\n');
    hasher.update(&json);
    out.extend_from_slice(&json);
    (out, hasher)
}

pub fn encode_trailer(content_len: u64, crc: u32) -> Vec<u8> {
    let mut t = TRAILER_TAG.to_vec();
    t.extend_from_slice(format!("{content_len} {crc:08x}\n").as_bytes());
    t
}

/// Longest envelope line accepted when reading a queue file back.
const MAX_ENVELOPE_LINE: u64 = 8 * 1024 * 1024;

/// Validates a queue file held in memory; see [`read_queue_file`].
pub fn decode_queue_file(bytes: &[u8]) -> Result<(Envelope, std::ops::Range<usize>), String> {
    let (env, _, range) =
        read_queue_file(std::io::Cursor::new(bytes)).map_err(|e| e.to_string())?;
    Ok((env, range.start as usize..range.end as usize))
}

/// Why a queue file could not be read: an I/O error (permissions, disk) says nothing about
/// the file; `Invalid` means the file itself is damaged.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for ReadError {
    fn from(s: String) -> ReadError {
        ReadError::Invalid(s)
    }
}

impl From<&str> for ReadError {
    fn from(s: &str) -> ReadError {
        ReadError::Invalid(s.to_string())
    }
}

/// What [`read_queue_file`] returns: the envelope, the slot (`None` if damaged), and the
/// content's byte range.
pub type QueueFile = (Envelope, Option<Slot>, std::ops::Range<u64>);

/// Reads a queue file's envelope and checks its end record, length and checksum, streaming
/// (a 100 MB message is not loaded into memory). Returns the envelope and the content's byte
/// range. `Err` says what is wrong, for the log line that moves the file to `corrupt/`.
pub fn read_queue_file<R: Read + Seek>(mut r: R) -> Result<QueueFile, ReadError> {
    let io = ReadError::Io;
    let head = read_head(&mut r)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(QUEUE_MAGIC);
    hasher.update(&head.envelope_line);
    let (content_start, clen, crc, tpos) = (head.content_start, head.clen, head.crc, head.tpos);
    r.seek(SeekFrom::Start(content_start)).map_err(io)?;
    let mut content = (&mut r).take(clen);
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = 0u64;
    loop {
        let n = content.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        seen += n as u64;
    }
    if seen != clen {
        return Err("file shorter than its end record".into());
    }
    if hasher.finalize() != crc {
        return Err("checksum mismatch".into());
    }
    if head.envelope.recipients.is_empty() {
        return Err("envelope has no recipients".into());
    }
    Ok((head.envelope, head.slot, content_start..tpos))
}

/// Like [`read_queue_file`] without reading the content: the envelope, the slot and the
/// content's range from the end record, for listings (`mailbridge queue list`). The checksum
/// is not verified.
pub fn read_queue_head<R: Read + Seek>(mut r: R) -> Result<QueueFile, ReadError> {
    let head = read_head(&mut r)?;
    Ok((head.envelope, head.slot, head.content_start..head.tpos))
}

struct Head {
    envelope: Envelope,
    slot: Option<Slot>,
    /// The envelope line as stored, newline included (it is covered by the checksum).
    envelope_line: Vec<u8>,
    content_start: u64,
    /// Content length and checksum from the end record, and where the end record starts.
    clen: u64,
    crc: u32,
    tpos: u64,
}

/// The version header, slot, envelope and end record of a queue file.
fn read_head<R: Read + Seek>(r: &mut R) -> Result<Head, ReadError> {
    let io = ReadError::Io;
    let len = r.seek(SeekFrom::End(0)).map_err(io)?;
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let (envelope, slot, line, content_start) = {
        let mut br = BufReader::new(&mut *r);
        let mut magic = vec![0u8; QUEUE_MAGIC.len()];
        br.read_exact(&mut magic)
            .map_err(|_| "missing or unknown version header")?;
        if magic != QUEUE_MAGIC {
            return Err("missing or unknown version header".into());
        }
        let mut slot = [0u8; SLOT_LEN];
        br.read_exact(&mut slot)
            .map_err(|_| "truncated attempt slot")?;
        let slot = Slot::decode(&slot);
        let mut line = Vec::new();
        (&mut br)
            .take(MAX_ENVELOPE_LINE)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        if line.last() != Some(&b'\n') {
            return Err("envelope line not terminated".into());
        }
        let envelope: Envelope = serde_json::from_slice(&line[..line.len() - 1])
            .map_err(|e| format!("bad envelope: {e}"))?;
        let start = (magic.len() + SLOT_LEN + line.len()) as u64;
        (envelope, slot, line, start)
    };
    // The end record is in the last few dozen bytes.
    let tail_len = (len - content_start).min(96);
    r.seek(SeekFrom::Start(len - tail_len)).map_err(io)?;
    let mut tail = Vec::new();
    (&mut *r)
        .take(tail_len)
        .read_to_end(&mut tail)
        .map_err(io)?;
    let pos = tail
        .windows(TRAILER_TAG.len())
        .rposition(|w| w == TRAILER_TAG)
        .ok_or("no end record (truncated file)")?;
    let tpos = len - tail_len + pos as u64;
    let trailer =
        std::str::from_utf8(&tail[pos + TRAILER_TAG.len()..]).map_err(|_| "bad end record")?;
    let trailer = trailer
        .strip_suffix('\n')
        .ok_or("end record not terminated")?;
    let (clen, crc) = trailer.split_once(' ').ok_or("bad end record")?;
    let clen: u64 = clen.parse().map_err(|_| "bad length in end record")?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| "bad checksum in end record")?;
    if content_start + clen != tpos {
        return Err(ReadError::Invalid(format!(
            "length mismatch: end record says {clen} content bytes, file has {}",
            tpos - content_start
        )));
    }
    Ok(Head {
        envelope,
        slot,
        envelope_line: line,
        content_start,
        clen,
        crc,
        tpos,
    })
}

pub fn encode_state(state: &State) -> Vec<u8> {
    let json = serde_json::to_vec(state).unwrap_or_default();
    let mut out = format!("{STATE_MAGIC}{:08x}\n", crc32fast::hash(&json)).into_bytes();
    out.extend_from_slice(&json);
    out.push(b'\n');
    out
}

pub fn decode_state(bytes: &[u8], recipients: usize) -> Result<State, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let (head, json) = text.split_once('\n').ok_or("no header line")?;
    let crc = head
        .strip_prefix(STATE_MAGIC)
        .ok_or("missing or unknown version header")?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| "bad checksum field")?;
    let json = json.strip_suffix('\n').ok_or("truncated")?;
    if crc32fast::hash(json.as_bytes()) != crc {
        return Err("checksum mismatch".into());
    }
    let mut state: State = serde_json::from_str(json).map_err(|e| format!("bad state: {e}"))?;
    if state.recipients.len() != recipients {
        return Err("recipient count does not match the envelope".into());
    }
    // Outcomes are diagnostics: a bad reference loses that outcome, never the message.
    state.compact();
    Ok(state)
}

#[cfg(test)]
impl Envelope {
    /// For unit tests: a message from `sender` to `recipients`, from 127.0.0.1 (HELO `t`),
    /// arrived now.
    pub fn for_test(id: &str, sender: &str, recipients: &[&str]) -> Envelope {
        Envelope {
            id: id.into(),
            sender: sender.into(),
            recipients: recipients
                .iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                })
                .collect(),
            client_ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            helo: "t".into(),
            auth_user: None,
            arrival_ms: crate::spool::now_ms(),
            body: None,
            smtputf8: false,
            upstream: None,
            report: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            id: "q1".into(),
            sender: "a@b".into(),
            recipients: vec![Recipient {
                address: "c@d".into(),
            }],
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "printer".into(),
            auth_user: None,
            arrival_ms: 1,
            body: None,
            smtputf8: false,
            upstream: None,
            report: false,
        }
    }

    fn file(content: &[u8]) -> Vec<u8> {
        let (mut f, mut hasher) = encode_header(&env());
        f.extend_from_slice(content);
        hasher.update(content);
        f.extend_from_slice(&encode_trailer(content.len() as u64, hasher.finalize()));
        f
    }

    #[test]
    fn slot_round_trip_and_damage() {
        let s = Slot {
            attempts: 3,
            next_attempt_ms: 1_795_819_497_316,
            in_flight: true,
        };
        let b = s.encode();
        assert_eq!(Slot::decode(&b), Some(s));
        let mut d = b;
        d[10] ^= 1;
        assert_eq!(Slot::decode(&d), None);
        // A damaged slot does not make the message invalid.
        let mut f = file(b"x\r\n");
        f[SLOT_OFFSET as usize + 9] = b'7';
        let (_, slot, range) = read_queue_file(std::io::Cursor::new(&f)).unwrap();
        assert_eq!(slot, None);
        assert_eq!(&f[range.start as usize..range.end as usize], b"x\r\n");
    }

    #[test]
    fn round_trip_including_trailer_lookalike_in_content() {
        let content = b"x\r\nMAILBRIDGE-END 5 00000000\r\n";
        let f = file(content);
        let (e, range) = decode_queue_file(&f).unwrap();
        assert_eq!(e, env());
        assert_eq!(&f[range], content);
    }

    #[test]
    fn truncation_and_bit_flips_are_detected() {
        let f = file(b"hello\r\n");
        for cut in 0..f.len() {
            assert!(decode_queue_file(&f[..cut]).is_err(), "cut at {cut}");
        }
        let slot = SLOT_OFFSET as usize..SLOT_OFFSET as usize + SLOT_LEN;
        for i in (0..f.len()).filter(|i| !slot.contains(i)) {
            let mut g = f.clone();
            g[i] ^= 0x01;
            assert!(decode_queue_file(&g).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let s = State::initial(&env());
        let b = encode_state(&s);
        assert_eq!(decode_state(&b, 1).unwrap(), s);
        assert!(decode_state(&b[..b.len() - 2], 1).is_err());
        assert!(decode_state(&b, 2).is_err());
    }

    /// A state file as the format wrote it before typed outcomes (the bytes of
    /// tests/support/spool-v1): it loads, with no outcomes, and its replies intact.
    #[test]
    fn state_without_outcomes_still_loads() {
        let old = include_bytes!(
            "../../tests/support/spool-v1/queue/01a234389637766eb09d6a34932d1931.state"
        );
        let st = decode_state(old, 3).unwrap();
        assert_eq!(st.attempts, 1);
        assert_eq!(st.last_error.as_deref(), Some("451 4.3.0 try later"));
        assert_eq!(st.last_outcome(), None);
        assert_eq!(st.history().count(), 0);
        assert_eq!(st.recipients[0].status, RcptStatus::Delivered);
        assert_eq!(st.recipients[1].status, RcptStatus::Pending);
        assert_eq!(
            st.recipients[1].reply.as_deref(),
            Some("451 4.3.0 try later")
        );
        assert!((0..3).all(|i| st.outcome_of(i).is_none()));
        assert_eq!(st.pending().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn state_with_outcomes_round_trips() {
        use crate::outcome::{Diagnosis, Outcome, Step, Verdict};
        let mut s = State::initial(&env());
        let o = Outcome {
            verdict: Verdict::Paused {
                until_ms: 1_795_000_000_000,
            },
            upstream: "m365".into(),
            at_ms: 1_794_999_999_000,
            attempt: 2,
            ..Outcome::deferred("535 5.7.139 Authentication unsuccessful".into())
                .at(Step::Auth)
                .with_problem(Some(Diagnosis {
                    key: "smtp_auth_disabled".into(),
                    meaning: "SMTP AUTH is off".into(),
                    remedy: "Set-CASMailbox".into(),
                }))
        };
        s.set_outcome(0, o.clone());
        s.set_last_outcome(o.clone());
        s.push_history(o.clone());
        let b = encode_state(&s);
        let back = decode_state(&b, 1).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.outcome_of(0), Some(&o));
        assert_eq!(back.last_outcome(), Some(&o));
        assert_eq!(back.history().collect::<Vec<_>>(), vec![&o]);
        // Stored once, referred to three times.
        assert_eq!(back.outcomes.len(), 1);
    }

    /// Many recipients with the same outcome store it once; replaced outcomes leave the
    /// table; the history is bounded; a dangling index (hand-edited file) is dropped.
    #[test]
    fn outcome_table_is_shared_compact_and_bounded() {
        use crate::outcome::Outcome;
        let mut e = env();
        e.recipients = (0..500)
            .map(|i| Recipient {
                address: format!("r{i}@x"),
            })
            .collect();
        let mut s = State::initial(&e);
        let paused = Outcome::deferred("535 5.7.139 x".into());
        for i in 0..500 {
            s.set_outcome(i, paused.clone());
        }
        assert_eq!(s.outcomes.len(), 1);
        let delivered = Outcome::delivered("250 ok".into());
        for i in 0..500 {
            s.set_outcome(i, delivered.clone());
        }
        assert_eq!(s.outcomes, vec![delivered.clone()]);
        for n in 0..(HISTORY_MAX as u32 + 5) {
            s.push_history(Outcome {
                attempt: n,
                ..paused.clone()
            });
        }
        let h: Vec<u32> = s.history().map(|o| o.attempt).collect();
        assert_eq!(h, (5..HISTORY_MAX as u32 + 5).collect::<Vec<_>>());
        assert_eq!(s.outcomes.len(), HISTORY_MAX + 1);
        let mut bad = State::initial(&env());
        bad.outcomes.push(delivered.clone());
        bad.recipients[0].outcome = Some(7);
        bad.last_outcome = Some(0);
        let back = decode_state(&encode_state(&bad), 1).unwrap();
        assert_eq!(back.outcome_of(0), None);
        assert_eq!(back.last_outcome(), Some(&delivered));
    }
}
