//! Who may join which dedup domain (`docs/dedupd.md`, "Domains"): root any; any other user
//! its own domain `uid-<uid>` and the domains the domains file lets it join, by its uid, its
//! primary gid or one of its supplementary groups (all as the kernel reports them for the
//! connection: `SO_PEERCRED`, `SO_PEERGROUPS`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::error::DedupdError;

/// Prefix of a user's own domain, `uid-<uid>`; reserved (the domains file cannot name one).
pub const OWN_DOMAIN_PREFIX: &str = "uid-";
/// Longest domain name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Largest domains file read (a file of thousands of domains is far smaller).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A connected process, as the kernel identifies it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Whether the peer is root (uid 0), which may join any domain.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A member entry of the domains file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Uid(u32),
    Gid(u32),
}

impl Member {
    fn admits(self, peer: &Peer) -> bool {
        match self {
            Member::Uid(uid) => peer.uid == uid,
            Member::Gid(gid) => peer.gid == gid || peer.groups.contains(&gid),
        }
    }
}

/// The domains file: domain name → its members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    domains: BTreeMap<String, Vec<Member>>,
}

/// Whether `name` is a valid domain name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A user's own domain.
pub fn own_domain(uid: u32) -> String {
    format!("{OWN_DOMAIN_PREFIX}{uid}")
}

impl Policy {
    /// Reads and parses the domains file (a regular file, opened without blocking).
    pub fn load(path: &Path) -> Result<Policy, DedupdError> {
        let read_error = |source| DedupdError::DomainsFile { path: path.to_path_buf(), source };
        let file = crate::checked_open::open_regular(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| read_error(crate::checked_open::HostFileError::Io(e)))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(DedupdError::DomainsSyntax {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("longer than {MAX_FILE_BYTES} bytes"),
            });
        }
        Policy::parse(&text).map_err(|(line, reason)| DedupdError::DomainsSyntax {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parses the domains file's text; an error names its line (1-based) and what is wrong.
    pub fn parse(text: &str) -> Result<Policy, (usize, String)> {
        let mut domains = BTreeMap::new();
        for (number, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (name, members) = parse_line(line).map_err(|reason| (number + 1, reason))?;
            if domains.insert(name.clone(), members).is_some() {
                return Err((number + 1, format!("domain {name} is defined twice")));
            }
        }
        Ok(Policy { domains })
    }

    /// Whether `peer` may join `domain` (a valid name).
    pub fn may_join(&self, peer: &Peer, domain: &str) -> bool {
        peer.is_root()
            || domain == own_domain(peer.uid)
            || self.domains.get(domain).is_some_and(|members| members.iter().any(|m| m.admits(peer)))
    }

    /// Domains the file defines.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// Whether the file defines no domain.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

fn parse_line(line: &str) -> Result<(String, Vec<Member>), String> {
    let Some((name, members)) = line.split_once(':') else {
        return Err("expected `name: members`".to_string());
    };
    let name = name.trim();
    if !valid_name(name) {
        return Err(format!(
            "invalid domain name {:?} (1 to {MAX_NAME_LEN} bytes of A-Z a-z 0-9 . _ -)",
            crate::escape_controls(name)
        ));
    }
    if name.starts_with(OWN_DOMAIN_PREFIX) {
        return Err(format!("domain names starting with {OWN_DOMAIN_PREFIX} are users' own domains"));
    }
    let members = members.split_whitespace().map(parse_member).collect::<Result<Vec<_>, _>>()?;
    if members.is_empty() {
        return Err(format!("domain {name} has no members"));
    }
    Ok((name.to_string(), members))
}

fn parse_member(word: &str) -> Result<Member, String> {
    let bad = || format!("invalid member {:?} (uid:N or gid:N)", crate::escape_controls(word));
    let (kind, id) = word.split_once(':').ok_or_else(bad)?;
    // Decimal digits only: u32::from_str would also take a leading '+'.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let id: u32 = id.parse().map_err(|_| bad())?;
    match kind {
        "uid" => Ok(Member::Uid(id)),
        "gid" => Ok(Member::Gid(id)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer { pid: 1, uid, gid, groups: groups.to_vec() }
    }

    #[test]
    fn members_join_by_uid_primary_gid_or_supplementary_group() {
        let policy =
            Policy::parse("# CI machines\nci: uid:1000 gid:50  # comment\n\nbuild.x_1: uid:7\n").unwrap();
        assert_eq!(policy.len(), 2);
        assert!(policy.may_join(&peer(1000, 1000, &[]), "ci"));
        assert!(policy.may_join(&peer(2000, 50, &[]), "ci"), "primary gid");
        assert!(policy.may_join(&peer(2000, 2000, &[3, 50]), "ci"), "supplementary group");
        assert!(!policy.may_join(&peer(2000, 2000, &[3]), "ci"));
        assert!(!policy.may_join(&peer(1000, 1000, &[]), "build.x_1"));
        assert!(!policy.may_join(&peer(1000, 1000, &[]), "unknown"));
        // Own domain, and root anywhere.
        assert!(policy.may_join(&peer(2000, 2000, &[]), "uid-2000"));
        assert!(!policy.may_join(&peer(2000, 2000, &[]), "uid-2001"));
        assert!(policy.may_join(&peer(0, 0, &[]), "anything"));
    }

    #[test]
    fn a_bad_file_names_its_line() {
        let cases = [
            ("ci uid 1\n", 1, "expected"),
            ("ok: uid:1\nbad name: uid:1\n", 2, "invalid domain name"),
            ("x: uid:1\n\nx: uid:2\n", 3, "twice"),
            ("uid-5: uid:6\n", 1, "own domains"),
            ("x:\n", 1, "no members"),
            ("x: user:1\n", 1, "invalid member"),
            ("x: uid:+1\n", 1, "invalid member"),
            ("x: uid:4294967296\n", 1, "invalid member"),
            ("x: gid:\n", 1, "invalid member"),
            (&format!("{}: uid:1\n", "a".repeat(65)), 1, "invalid domain name"),
        ];
        for (text, line, reason) in cases {
            let (l, r) = Policy::parse(text).unwrap_err();
            assert_eq!(l, line, "{text:?}: {r}");
            assert!(r.contains(reason), "{text:?}: {r}");
        }
    }

    #[test]
    fn names_are_bounded_and_plain() {
        assert!(valid_name("a") && valid_name("A-z.0_9") && valid_name(&"x".repeat(64)));
        for bad in ["", "a b", "a/b", "é", "a\n", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
