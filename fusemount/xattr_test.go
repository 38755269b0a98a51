package fusemount

import (
	"context"
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/stasis-project/stasis/chain/fsimage"
)

// attrsOnly is an inode that has only xattrs.
type attrsOnly struct {
	fsimage.Inode
	xs []fsimage.Xattr
}

func (a attrsOnly) Xattrs() ([]fsimage.Xattr, error) { return a.xs, nil }

// TestTrustedXattrsOnlyForRoot: as on the live filesystem, trusted.* attributes are listed
// and readable for root only; everyone else sees the rest.
func TestTrustedXattrsOnlyForRoot(t *testing.T) {
	n := &fileNode{node: attrsOnly{xs: []fsimage.Xattr{{Name: "user.a", Value: []byte("1")}, {Name: "trusted.b", Value: []byte("2")}}}}
	as := func(uid uint32) context.Context {
		return fuse.NewContext(context.Background(), &fuse.Caller{Owner: fuse.Owner{Uid: uid}})
	}
	buf := make([]byte, 100)
	for uid, want := range map[uint32]string{0: "user.a\x00trusted.b\x00", 1000: "user.a\x00"} {
		got, errno := n.Listxattr(as(uid), buf)
		if errno != 0 || string(buf[:got]) != want {
			t.Errorf("uid %d lists %q (%v), want %q", uid, buf[:got], errno, want)
		}
	}
	if _, errno := n.Getxattr(as(1000), "trusted.b", buf); errno != syscall.ENODATA {
		t.Errorf("uid 1000 reads trusted.b: %v, want ENODATA", errno)
	}
	if got, errno := n.Getxattr(as(0), "trusted.b", buf); errno != 0 || !strings.HasPrefix(string(buf[:got]), "2") {
		t.Errorf("root reads trusted.b: %q %v", buf[:got], errno)
	}
}
