//! The handshake that opens every connection between two ranks, so that only
//! members of the same generation join each other's groups.
//!
//! The coordinator hands every member of a generation the same secret with
//! its assignment. The accepting rank opens with a fresh challenge nonce;
//! the connecting rank answers with its [`Hello`] (generation, group,
//! sender and receiver rank), a nonce of its own and an HMAC-SHA256 over
//! both nonces and the hello; the acceptor replies with its verdict and, when
//! it admits the connection, an HMAC of its own, so each side knows the
//! other holds the secret. A stranger, a replayed handshake or a rank of
//! another generation is refused without learning the secret.
//!
//! Every read here watches the generation's [`Abort`] and a deadline, so a
//! peer that connects and says nothing cannot hold a rank past either.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::abort::Abort;

const HELLO_MAGIC: [u8; 8] = *b"SAMTCOL2";
const CHALLENGE_MAGIC: [u8; 8] = *b"SAMTCHL2";
const NONCE_LEN: usize = 16;
const TAG_LEN: usize = 32;
const HELLO_LEN: usize = 8 + 8 + 1 + 8 + 8;
const CHALLENGE_LEN: usize = 8 + NONCE_LEN;
/// What the connecting rank sends after the challenge.
const ANSWER_LEN: usize = HELLO_LEN + NONCE_LEN + TAG_LEN;

/// The claim every connection opens with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) generation: u64,
    pub(crate) group: u8,
    pub(crate) from: i64,
    pub(crate) to: i64,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&HELLO_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16] = self.group;
        b[17..25].copy_from_slice(&self.from.to_le_bytes());
        b[25..33].copy_from_slice(&self.to.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Hello> {
        if b.len() != HELLO_LEN || b[..8] != HELLO_MAGIC {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Hello {
            generation: word(8),
            group: b[16],
            from: word(17) as i64,
            to: word(25) as i64,
        })
    }
}

/// The generation's shared secret. Never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    fn mac(&self, role: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(role);
        for p in parts {
            mac.update(p);
        }
        mac
    }

    fn tag(&self, role: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
        self.mac(role, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is this secret's over `parts` (in constant time).
    fn verify(&self, role: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(role, parts).verify_slice(tag).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

const CONNECT_ROLE: &[u8] = b"samtrain-ring-connect";
const ACCEPT_ROLE: &[u8] = b"samtrain-ring-accept";

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("the operating system's random source");
    n
}

/// Fills `buf` from `stream`, giving up when `abort` fires or `deadline`
/// passes (checked every 100 ms while the peer is silent).
fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    abort: &Abort,
) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        if abort.is_triggered() {
            return Err(std::io::Error::new(ErrorKind::Interrupted, "aborted"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "the peer did not answer in time",
            ));
        }
        stream.set_read_timeout(Some(left.min(Duration::from_millis(100))))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ))
            }
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why a handshake failed, from the connecting side.
#[derive(Debug)]
pub(crate) enum ConnectFailure {
    Io(std::io::Error),
    /// The acceptor said no, and why.
    Refused(String),
}

/// The connecting side: answers the challenge with `hello` and checks the
/// acceptor's proof.
pub(crate) fn connect(
    stream: &mut TcpStream,
    hello: Hello,
    secret: &Secret,
    deadline: Instant,
    abort: &Abort,
) -> Result<(), ConnectFailure> {
    let io = ConnectFailure::Io;
    let mut challenge = [0u8; CHALLENGE_LEN];
    read_full(stream, &mut challenge, deadline, abort).map_err(io)?;
    if challenge[..8] != CHALLENGE_MAGIC {
        return Err(ConnectFailure::Refused(
            "the peer is not a samtrain collective listener".into(),
        ));
    }
    let theirs = &challenge[8..];
    let ours = nonce();
    let hello_bytes = hello.encode();
    let tag = secret.tag(CONNECT_ROLE, &[theirs, &hello_bytes, &ours]);
    let mut answer = Vec::with_capacity(ANSWER_LEN);
    answer.extend_from_slice(&hello_bytes);
    answer.extend_from_slice(&ours);
    answer.extend_from_slice(&tag);
    stream.write_all(&answer).map_err(io)?;

    let mut head = [0u8; 3];
    read_full(stream, &mut head, deadline, abort).map_err(io)?;
    let mut text = vec![0u8; u16::from_le_bytes([head[1], head[2]]) as usize];
    read_full(stream, &mut text, deadline, abort).map_err(io)?;
    if head[0] != 0 {
        return Err(ConnectFailure::Refused(
            String::from_utf8_lossy(&text).into_owned(),
        ));
    }
    let mut proof = [0u8; TAG_LEN];
    read_full(stream, &mut proof, deadline, abort).map_err(io)?;
    if !secret.verify(ACCEPT_ROLE, &[&ours, &hello_bytes, theirs], &proof) {
        return Err(ConnectFailure::Refused(
            "the listener did not prove it holds this generation's secret".into(),
        ));
    }
    Ok(())
}

/// A connection whose sender proved it holds the secret, awaiting the
/// acceptor's verdict on its place in the groups.
pub(crate) struct Claimed {
    pub(crate) stream: TcpStream,
    pub(crate) hello: Hello,
    challenge: [u8; NONCE_LEN],
    answer: [u8; NONCE_LEN],
}

/// The accepting side, up to the proof: challenges, reads the answer and
/// checks the generation, the receiver and the HMAC. What remains (is this
/// the rank wanted in that group?) is the caller's [`Claimed::admit`] or
/// [`Claimed::refuse`]. An `Err` carries the refusal already sent.
pub(crate) fn accept(
    mut stream: TcpStream,
    generation: u64,
    rank: i64,
    secret: &Secret,
    deadline: Instant,
    abort: &Abort,
) -> Result<Claimed, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let challenge = nonce();
    let mut opening = [0u8; CHALLENGE_LEN];
    opening[..8].copy_from_slice(&CHALLENGE_MAGIC);
    opening[8..].copy_from_slice(&challenge);
    stream.write_all(&opening).map_err(|e| e.to_string())?;
    let mut answer = [0u8; ANSWER_LEN];
    read_full(&mut stream, &mut answer, deadline, abort)
        .map_err(|e| format!("no handshake: {e}"))?;
    let (hello_bytes, rest) = answer.split_at(HELLO_LEN);
    let (their_nonce, tag) = rest.split_at(NONCE_LEN);
    let verdict = match Hello::decode(hello_bytes) {
        None => Err("not a samtrain collective handshake".to_string()),
        Some(h) if h.generation != generation => Err(format!(
            "generation mismatch: rank {rank} is in generation {generation}, the connection is from generation {}",
            h.generation
        )),
        Some(h) if h.to != rank => Err(format!("this listener is rank {rank}, not rank {}", h.to)),
        Some(_) if !secret.verify(CONNECT_ROLE, &[&challenge, hello_bytes, their_nonce], tag) => {
            Err("not authenticated: the connection does not hold this generation's secret".to_string())
        }
        Some(h) => Ok(h),
    };
    match verdict {
        Ok(hello) => Ok(Claimed {
            stream,
            hello,
            challenge,
            answer: their_nonce.try_into().expect("nonce length"),
        }),
        Err(reason) => {
            let _ = write_verdict(&mut stream, Some(&reason), None);
            Err(reason)
        }
    }
}

impl Claimed {
    /// Admits the connection, proving this side holds the secret too.
    pub(crate) fn admit(mut self, secret: &Secret) -> std::io::Result<TcpStream> {
        let proof = secret.tag(
            ACCEPT_ROLE,
            &[&self.answer, &self.hello.encode(), &self.challenge],
        );
        write_verdict(&mut self.stream, None, Some(&proof))?;
        Ok(self.stream)
    }

    /// Refuses it, telling the other side why (best effort).
    pub(crate) fn refuse(mut self, reason: &str) {
        let _ = write_verdict(&mut self.stream, Some(reason), None);
    }
}

/// Status byte, a length-prefixed reason, then the proof when admitted.
fn write_verdict(
    stream: &mut TcpStream,
    reason: Option<&str>,
    proof: Option<&[u8; TAG_LEN]>,
) -> std::io::Result<()> {
    let text = reason.unwrap_or("").as_bytes();
    let len = text.len().min(u16::MAX as usize);
    let mut msg = Vec::with_capacity(3 + len + TAG_LEN);
    msg.push(u8::from(reason.is_some()));
    msg.extend_from_slice(&(len as u16).to_le_bytes());
    msg.extend_from_slice(&text[..len]);
    if let Some(p) = proof {
        msg.extend_from_slice(p);
    }
    stream.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        (c, a)
    }

    fn hello() -> Hello {
        Hello {
            generation: 7,
            group: 1,
            from: 0,
            to: 1,
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn holders_of_the_secret_admit_each_other() {
        let (mut c, a) = pair();
        let secret = Secret::new(b"generation-7".to_vec());
        let s = secret.clone();
        let acceptor = std::thread::spawn(move || {
            let claimed = accept(a, 7, 1, &s, soon(), &Abort::new()).unwrap();
            assert_eq!(claimed.hello, hello());
            claimed.admit(&s).unwrap();
        });
        connect(&mut c, hello(), &secret, soon(), &Abort::new()).unwrap();
        acceptor.join().unwrap();
    }

    #[test]
    fn a_stranger_without_the_secret_is_refused() {
        let (mut c, a) = pair();
        let acceptor = std::thread::spawn(move || {
            let s = Secret::new(b"generation-7".to_vec());
            accept(a, 7, 1, &s, soon(), &Abort::new()).err().unwrap()
        });
        let wrong = Secret::new(b"guessed".to_vec());
        let err = connect(&mut c, hello(), &wrong, soon(), &Abort::new()).unwrap_err();
        assert!(
            matches!(&err, ConnectFailure::Refused(r) if r.contains("not authenticated")),
            "{err:?}"
        );
        assert!(acceptor.join().unwrap().contains("not authenticated"));
    }

    #[test]
    fn a_silent_peer_is_dropped_at_abort() {
        let (_silent, a) = pair();
        let abort = Abort::new();
        let flag = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            flag.trigger();
        });
        let started = Instant::now();
        let s = Secret::new(b"k".to_vec());
        let far = Instant::now() + Duration::from_secs(60);
        let err = accept(a, 7, 1, &s, far, &abort).err().unwrap();
        assert!(err.contains("aborted"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
