//! Just enough TLS to read the server name a ClientHello asks for.
//!
//! Input is hostile: every length is checked against what is there, and a
//! record that is not a well-formed ClientHello is reported as such.

/// What the first bytes of a tunnel are.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not (the start of) a TLS handshake.
    NotTls,
    /// A TLS handshake whose ClientHello is not complete yet.
    Incomplete,
    /// A ClientHello with this SNI (None: no server_name extension).
    Sni(Option<String>),
    /// A TLS record that is not a well-formed ClientHello.
    Malformed,
    /// A ClientHello carrying Encrypted Client Hello (or draft ESNI): the
    /// real server name is hidden, so it cannot be checked.
    Encrypted,
}

/// How many bytes the first TLS record needs (5 until its header is in).
/// Lets a caller skip re-parsing while a record is still arriving.
pub fn first_record_len(buf: &[u8]) -> usize {
    if buf.len() < 5 {
        5
    } else {
        5 + (((buf[3] as usize) << 8) | buf[4] as usize)
    }
}

struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| ((b[0] as usize) << 8) | b[1] as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
}

/// Largest ClientHello accepted (several TLS records are reassembled).
pub const MAX_HELLO: usize = 16 << 10;

/// Inspects the first bytes a client sent into a tunnel.
pub fn client_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    // Reassemble handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            break;
        }
        if rest[0] != 0x16 || rest[1] != 0x03 {
            return Hello::Malformed;
        }
        let len = ((rest[3] as usize) << 8) | rest[4] as usize;
        if len == 0 || len > (1 << 14) + 256 {
            return Hello::Malformed;
        }
        if rest.len() < 5 + len {
            hs.extend_from_slice(&rest[5..]);
            break;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs.len() >= 4 {
            let want = 4 + (((hs[1] as usize) << 16) | ((hs[2] as usize) << 8) | hs[3] as usize);
            if hs.len() >= want {
                break;
            }
        }
    }
    if hs.len() < 4 {
        return Hello::Incomplete;
    }
    if hs[0] != 0x01 {
        return Hello::Malformed;
    }
    let mut c = Cur { b: &hs[1..] };
    let Some(body_len) = c.u24() else {
        return Hello::Incomplete;
    };
    if body_len > MAX_HELLO {
        return Hello::Malformed;
    }
    let Some(body) = c.take(body_len) else {
        return Hello::Incomplete;
    };
    parse_body(body).unwrap_or(Hello::Malformed)
}

fn parse_body(body: &[u8]) -> Option<Hello> {
    let mut c = Cur { b: body };
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    let sid = c.u8()?;
    c.take(sid)?;
    let suites = c.u16()?;
    c.take(suites)?;
    let comp = c.u8()?;
    c.take(comp)?;
    if c.b.is_empty() {
        return Some(Hello::Sni(None));
    }
    let ext_len = c.u16()?;
    let mut e = Cur {
        b: c.take(ext_len)?,
    };
    let mut sni = None;
    while !e.b.is_empty() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let data = e.take(len)?;
        if kind == 0xfe0d || kind == 0xffce {
            return Some(Hello::Encrypted);
        }
        if kind == 0 {
            if sni.is_some() {
                return None; // two server_name extensions: ambiguous
            }
            let mut s = Cur { b: data };
            let list = s.u16()?;
            let mut l = Cur { b: s.take(list)? };
            let mut name = None;
            while !l.b.is_empty() {
                let typ = l.u8()?;
                let n = l.u16()?;
                let v = l.take(n)?;
                if typ == 0 {
                    if name.is_some() {
                        return None;
                    }
                    name = Some(String::from_utf8(v.to_vec()).ok()?);
                }
            }
            sni = Some(name?);
        }
    }
    Some(Hello::Sni(sni))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello with an optional SNI, as one TLS record.
    pub fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut ext = Vec::new();
        if let Some(n) = sni {
            let n = n.as_bytes();
            let mut list = vec![0u8];
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(&data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1u8];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_sni_and_refuses_garbage() {
        let h = hello(Some("allowed.test"));
        assert_eq!(client_hello(&h), Hello::Sni(Some("allowed.test".into())));
        assert_eq!(client_hello(&hello(None)), Hello::Sni(None));
        assert_eq!(client_hello(&h[..20]), Hello::Incomplete);
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        let mut bad = h.clone();
        bad[5] = 2; // ServerHello
        assert_eq!(client_hello(&bad), Hello::Malformed);
        // Split across two records.
        let hs = &h[5..];
        let mut two = vec![0x16, 0x03, 0x01, 0, 10];
        two.extend_from_slice(&hs[..10]);
        two.extend_from_slice(&[0x16, 0x03, 0x01]);
        two.extend_from_slice(&((hs.len() - 10) as u16).to_be_bytes());
        two.extend_from_slice(&hs[10..]);
        assert_eq!(client_hello(&two), Hello::Sni(Some("allowed.test".into())));
        // Lengths that point past the data never panic.
        for cut in 0..h.len() {
            let mut x = h.clone();
            x[cut] = 0xff;
            let _ = client_hello(&x);
        }
    }
}
