//! `TextArena`: append-only storage of every inserted character, addressed by arena offset.
//! Spans point into it, so the content tree holds no strings.
//! It uses 1 byte per char while every char is below U+0100, 2 while all are in the Basic Multilingual Plane, else 4.
//! It never shrinks: deleted text stays until the document is rebuilt from a snapshot.

/// Append-only char storage in the narrowest width that holds every char so far.
#[derive(Clone, Debug)]
pub(crate) enum TextArena {
    /// Every char is below U+0100.
    Narrow(Vec<u8>),
    /// Every char is below U+10000 (never a surrogate: a `char` cannot be one).
    Bmp(Vec<u16>),
    /// Any char.
    Wide(Vec<char>),
}

impl Default for TextArena {
    fn default() -> Self {
        TextArena::Narrow(Vec::new())
    }
}

fn bmp_char(unit: u16) -> char {
    char::from_u32(unit as u32).unwrap_or(char::REPLACEMENT_CHARACTER)
}

impl TextArena {
    /// Number of chars stored.
    pub(crate) fn len(&self) -> usize {
        match self {
            TextArena::Narrow(v) => v.len(),
            TextArena::Bmp(v) => v.len(),
            TextArena::Wide(v) => v.len(),
        }
    }

    /// Appends `s`; returns the arena offset of its first char.
    #[inline]
    pub(crate) fn push_str(&mut self, s: &str) -> usize {
        let start = self.len();
        if let TextArena::Narrow(v) = self {
            if s.is_ascii() {
                v.extend_from_slice(s.as_bytes());
                return start;
            }
            if s.chars().all(|c| (c as u32) < 0x100) {
                v.extend(s.chars().map(|c| c as u8));
                return start;
            }
            *self = TextArena::Bmp(v.iter().map(|&b| b as u16).collect());
        }
        if let TextArena::Bmp(v) = self {
            if s.chars().all(|c| (c as u32) < 0x10000) {
                v.extend(s.chars().map(|c| c as u16));
                return start;
            }
            *self = TextArena::Wide(v.iter().map(|&u| bmp_char(u)).collect());
        }
        if let TextArena::Wide(v) = self {
            v.extend(s.chars());
        }
        start
    }

    /// The char at arena offset `i`.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> char {
        match self {
            TextArena::Narrow(v) => v[i] as char,
            TextArena::Bmp(v) => bmp_char(v[i]),
            TextArena::Wide(v) => v[i],
        }
    }

    /// Appends chars `start .. start+len` to `out`.
    pub(crate) fn write_to(&self, out: &mut String, start: usize, len: usize) {
        match self {
            TextArena::Narrow(v) => {
                let bytes = &v[start..start + len];
                match std::str::from_utf8(bytes) {
                    // ASCII bytes are UTF-8 as they are.
                    Ok(s) if bytes.is_ascii() => out.push_str(s),
                    _ => out.extend(bytes.iter().map(|&b| b as char)),
                }
            }
            TextArena::Bmp(v) => out.extend(v[start..start + len].iter().map(|&u| bmp_char(u))),
            TextArena::Wide(v) => out.extend(&v[start..start + len]),
        }
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            TextArena::Narrow(v) => v.capacity(),
            TextArena::Bmp(v) => v.capacity() * 2,
            TextArena::Wide(v) => v.capacity() * 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TextArena;

    #[test]
    fn widens_and_keeps_every_char() {
        let mut arena = TextArena::default();
        let parts = ["ab", "é", "—x", "😀", "z"];
        let mut all = String::new();
        for p in parts {
            let start = arena.push_str(p);
            assert_eq!(start, all.chars().count());
            all.push_str(p);
        }
        assert!(matches!(arena, TextArena::Wide(_)));
        let mut out = String::new();
        arena.write_to(&mut out, 0, arena.len());
        assert_eq!(out, all);
        assert_eq!(arena.get(2), 'é');
        assert_eq!(arena.get(5), '😀');
    }
}
