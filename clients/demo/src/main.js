// The demo editor at /: CodeMirror 6 bound to a collab-engine document through
// clients/codemirror/collab-codemirror.js, with line numbers, the connection and saved state,
// the people present and their carets, and the share link. The token (when the server checks
// them) comes from the page's own address, `/?doc=NAME&token=JWT`.
//
// Bundled with CodeMirror into dist/app.js by ../build.sh; the server embeds that file.
import { EditorState } from '@codemirror/state';
import { EditorView, keymap, lineNumbers, drawSelection, highlightActiveLine, highlightActiveLineGutter } from '@codemirror/view';
import { defaultKeymap, history, historyKeymap } from '@codemirror/commands';
import { CollabClient } from '../../js/collab.js';
import { collab, collabBinding } from '../../codemirror/collab-codemirror.js';
import { $, setUpPage, identity, followReplica, showStatus, renderPeople } from '../page.js';

const { params, docName, token, wsUrl } = setUpPage();
const me = identity(params);
const client = new CollabClient({ url: wsUrl, doc: docName, token, presence: null });
const view = new EditorView({
  parent: $('editor'),
  state: EditorState.create({
    doc: client.text(),
    extensions: [
      lineNumbers(),
      highlightActiveLineGutter(),
      highlightActiveLine(),
      drawSelection(),
      history(),
      keymap.of([...defaultKeymap, ...historyKeymap]),
      EditorView.lineWrapping,
      EditorView.contentAttributes.of({ spellcheck: 'false', 'aria-label': 'Document' }),
      collab(client, { presence: me }),
    ],
  }),
});
const binding = collabBinding(view);

followReplica(client, binding, me);
showStatus(client);

// The sidebar and the stats at most once a frame, whatever the edit rate.
let frame = 0;
function scheduleRender() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    renderPeople(client);
  });
}
client.on('presence', scheduleRender);
client.on('change', scheduleRender);
client.on('status', scheduleRender);
scheduleRender();

// For the browser tests and for poking around in the console.
window.collabDemo = { client, view, binding, docName, me };
