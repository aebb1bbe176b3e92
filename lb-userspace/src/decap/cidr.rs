//! Allow-list prefixes for `lb decap attach --allow-source`.

use std::{fmt, net::IpAddr, str::FromStr};

/// An address prefix, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!(
                "prefix length {prefix_len} is longer than {max} bits"
            ));
        }
        let cidr = Self { addr, prefix_len };
        let masked = cidr.network();
        if masked != addr {
            return Err(format!(
                "{addr}/{prefix_len} has host bits set (the prefix is {masked}/{prefix_len})"
            ));
        }
        Ok(cidr)
    }

    /// Whether `addr` is inside the prefix (never across families).
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4()
            && Self {
                addr,
                prefix_len: self.prefix_len,
            }
            .network()
                == self.addr
    }

    /// The address with the host bits cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - self.prefix_len as u32)
                    .unwrap_or(0);
                IpAddr::V4((a.to_bits() & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - self.prefix_len as u32)
                    .unwrap_or(0);
                IpAddr::V6((a.to_bits() & mask).into())
            }
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDR/LEN`, or a bare address (a host: /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{addr}\" is not an IPv4 or IPv6 address"))?;
        let len = match len {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(l) => l
                .parse::<u8>()
                .map_err(|_| format!("prefix length \"{l}\" is not a number of bits"))?,
        };
        Self::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Parses every `--allow-source` value; the error names the first bad one
/// by position and value.
pub fn parse_allow_list(values: &[String]) -> Result<Vec<Cidr>, String> {
    if values.is_empty() {
        return Err(
            "at least one --allow-source CIDR is required: the addresses of the load \
                    balancers allowed to send tunnel packets to this host"
                .into(),
        );
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let c = v
            .parse::<Cidr>()
            .map_err(|e| format!("--allow-source #{} (\"{v}\"): {e}", i + 1))?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_hosts_parse() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert_eq!(c.to_string(), "198.18.0.0/15");
        assert_eq!("198.18.1.2".parse::<Cidr>().unwrap().prefix_len, 32);
        assert_eq!("2001:2::/48".parse::<Cidr>().unwrap().prefix_len, 48);
        assert_eq!("2001:2::1".parse::<Cidr>().unwrap().prefix_len, 128);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len, 0);
    }

    #[test]
    fn bad_prefixes_say_what_is_wrong() {
        let e = "198.18.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.contains("33") && e.contains("32 bits"), "{e}");
        let e = "198.18.0.1/24".parse::<Cidr>().unwrap_err();
        assert!(
            e.contains("host bits") && e.contains("198.18.0.0/24"),
            "{e}"
        );
        let e = "lb1/24".parse::<Cidr>().unwrap_err();
        assert!(e.contains("\"lb1\""), "{e}");
        let e = "198.18.0.0/x".parse::<Cidr>().unwrap_err();
        assert!(e.contains("\"x\""), "{e}");
    }

    #[test]
    fn the_list_error_names_the_position() {
        let v = vec!["198.18.0.0/24".to_string(), "2001:2::/129".to_string()];
        let e = parse_allow_list(&v).unwrap_err();
        assert!(e.starts_with("--allow-source #2 (\"2001:2::/129\")"), "{e}");
        assert!(parse_allow_list(&[]).unwrap_err().contains("at least one"));
    }
}
